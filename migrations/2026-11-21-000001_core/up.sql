-- The core of assetflow: parties, catalogue, orders, settlements, assets and their certificates,
-- deliveries, and the outbox/inbox/dead-letter plumbing that makes the guarantees hold.
-- Money is always BIGINT minor units. Times are TIMESTAMPTZ.

CREATE TABLE partners (
    id         TEXT PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE gateways (
    id         TEXT PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE terminals (
    id             TEXT PRIMARY KEY,
    kind           TEXT NOT NULL CHECK (kind IN ('mobile', 'stationary', 'pos', 'gate')),
    gateway_id     TEXT NOT NULL REFERENCES gateways (id),
    -- The payment method: the partner that settles what this terminal pays for. NULL: cannot pay.
    partner_id     TEXT REFERENCES partners (id),
    public_key_pem TEXT NOT NULL,
    registered_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE products (
    id                      TEXT PRIMARY KEY,
    kind                    TEXT NOT NULL CHECK (kind IN ('prepaid_card', 'ticket', 'ppv_ticket', 'coupon')),
    title                   TEXT NOT NULL,
    issuer_id               TEXT NOT NULL,
    price_minor             BIGINT NOT NULL CHECK (price_minor >= 0),
    currency                TEXT NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- Stored value of a prepaid card, or the number of uses of a ticket or coupon.
    value_minor             BIGINT CHECK (value_minor >= 0),
    uses                    INTEGER CHECK (uses > 0),
    -- The asset's own term: a fixed end (a concert) or a validity from issue (a card).
    asset_expires_at        TIMESTAMPTZ,
    asset_validity_secs     BIGINT CHECK (asset_validity_secs > 0),
    -- The exchange certificate's term, fixed or from issue.
    certificate_expires_at  TIMESTAMPTZ,
    certificate_validity_secs BIGINT CHECK (certificate_validity_secs > 0),
    -- Near-expiry reminder offsets before the certificate expires (docs/product.md#near-expiry-reminders).
    reminder_stage1_secs    BIGINT NOT NULL DEFAULT 172800 CHECK (reminder_stage1_secs > 0),
    reminder_stage2_secs    BIGINT NOT NULL DEFAULT 86400 CHECK (reminder_stage2_secs > 0),
    stage2_policy           TEXT NOT NULL DEFAULT 'download_request'
                            CHECK (stage2_policy IN ('download_request', 'forced_transmission')),
    transferable            BOOLEAN NOT NULL DEFAULT false,
    on_sale                 BOOLEAN NOT NULL DEFAULT true,
    tags                    JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (asset_expires_at IS NOT NULL OR asset_validity_secs IS NOT NULL),
    CHECK (certificate_expires_at IS NOT NULL OR certificate_validity_secs IS NOT NULL),
    CHECK (reminder_stage1_secs > reminder_stage2_secs)
);

-- Every signed terminal request that passed its signature check, keyed by its request id.
-- This is the idempotency record: a repeated request id gets this row's outcome back.
CREATE TABLE terminal_requests (
    request_id   TEXT PRIMARY KEY,
    terminal_id  TEXT NOT NULL REFERENCES terminals (id),
    message_type TEXT NOT NULL,
    -- SHA-256 of the canonical request: the same id with other content is refused.
    content_sha256 TEXT NOT NULL,
    sent_at      TIMESTAMPTZ NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    outcome      TEXT NOT NULL CHECK (outcome IN ('accepted', 'refused')),
    reason       TEXT,
    -- What the request created or acted on: an order id, an asset id.
    subject_id   UUID
);

CREATE TABLE orders (
    id                     UUID PRIMARY KEY,
    request_id             TEXT NOT NULL UNIQUE REFERENCES terminal_requests (request_id) DEFERRABLE INITIALLY DEFERRED,
    orderer_terminal_id    TEXT NOT NULL REFERENCES terminals (id),
    payer_terminal_id      TEXT NOT NULL REFERENCES terminals (id),
    recipient_terminal_ids TEXT[] NOT NULL CHECK (cardinality(recipient_terminal_ids) > 0),
    product_id             TEXT NOT NULL REFERENCES products (id),
    quantity               INTEGER NOT NULL CHECK (quantity > 0),
    amount_minor           BIGINT NOT NULL CHECK (amount_minor >= 0),
    currency               TEXT NOT NULL,
    delivery_mode          TEXT NOT NULL CHECK (delivery_mode IN ('certificate', 'designated', 'immediate')),
    designated_at          TIMESTAMPTZ,
    status                 TEXT NOT NULL CHECK (status IN ('settling', 'issuing', 'issued', 'declined', 'failed')),
    status_reason          TEXT,
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((delivery_mode = 'certificate') = (designated_at IS NULL))
);
CREATE INDEX orders_status_idx ON orders (status) WHERE status IN ('settling', 'issuing');

CREATE TABLE settlements (
    id                UUID PRIMARY KEY,
    order_id          UUID NOT NULL REFERENCES orders (id),
    kind              TEXT NOT NULL CHECK (kind IN ('purchase', 'refund')),
    partner_id        TEXT NOT NULL REFERENCES partners (id),
    payer_terminal_id TEXT NOT NULL REFERENCES terminals (id),
    amount_minor      BIGINT NOT NULL CHECK (amount_minor >= 0),
    currency          TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('instructed', 'settled', 'declined', 'abandoned')),
    attempts          INTEGER NOT NULL DEFAULT 1 CHECK (attempts > 0),
    -- When the partner's answer is due; past it the instruction is sent again or abandoned.
    answer_due_at     TIMESTAMPTZ,
    partner_reference TEXT,
    reason            TEXT,
    instructed_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    answered_at       TIMESTAMPTZ,
    -- One settlement of each kind per order: a duplicate can never settle twice.
    UNIQUE (order_id, kind)
);
CREATE INDEX settlements_answer_due_idx ON settlements (answer_due_at) WHERE status = 'instructed';

-- The asset record (docs/product.md#the-asset-record), one row per electronic asset.
CREATE TABLE assets (
    id                       UUID PRIMARY KEY,                 -- 300a
    order_id                 UUID NOT NULL REFERENCES orders (id),
    -- Which of the order's assets this is, per recipient: issuing twice hits the unique key.
    recipient_terminal_id    TEXT NOT NULL REFERENCES terminals (id),
    ordinal                  INTEGER NOT NULL CHECK (ordinal >= 0),
    product_id               TEXT NOT NULL REFERENCES products (id),
    kind                     TEXT NOT NULL,
    issuer_id                TEXT NOT NULL,
    holder_terminal_id       TEXT NOT NULL REFERENCES terminals (id),
    issued_at                TIMESTAMPTZ NOT NULL,             -- 300b
    expires_at               TIMESTAMPTZ NOT NULL,             -- 300c
    has_exchange_certificate BOOLEAN NOT NULL,                 -- 300d
    certificate_expires_at   TIMESTAMPTZ,                      -- 300e
    status                   TEXT NOT NULL CHECK (status IN (  -- 300f
        'awaiting_exchange', 'awaiting_designated_delivery', 'delivered',
        'expired_certificate_processing', 'retransmitting', 'forced_retransmitting',
        'force_delivered', 'expired', 'refunded')),
    transferable             BOOLEAN NOT NULL,
    designated_at            TIMESTAMPTZ,
    value_minor              BIGINT,
    remaining_minor          BIGINT,
    remaining_uses           INTEGER,
    currency                 TEXT NOT NULL,
    -- The signed asset document (canonical JSON) and its two signatures.
    document                 TEXT NOT NULL,
    issuer_signature         TEXT NOT NULL,
    provider_signature       TEXT NOT NULL,
    status_changed_at        TIMESTAMPTZ NOT NULL,
    UNIQUE (order_id, recipient_terminal_id, ordinal),
    CHECK (has_exchange_certificate = (certificate_expires_at IS NOT NULL))
);
CREATE INDEX assets_order_idx ON assets (order_id);
CREATE INDEX assets_designated_idx ON assets (designated_at) WHERE status = 'awaiting_designated_delivery';
CREATE INDEX assets_expires_idx ON assets (expires_at)
    WHERE status NOT IN ('delivered', 'force_delivered', 'expired', 'refunded');

CREATE TABLE exchange_certificates (
    id                  UUID PRIMARY KEY,
    asset_id            UUID NOT NULL UNIQUE REFERENCES assets (id),  -- one certificate per asset
    holder_terminal_id  TEXT NOT NULL REFERENCES terminals (id),
    issued_at           TIMESTAMPTZ NOT NULL,
    expires_at          TIMESTAMPTZ NOT NULL,
    document            TEXT NOT NULL,
    signature           TEXT NOT NULL,
    exchanged_at        TIMESTAMPTZ,
    exchange_request_id TEXT UNIQUE REFERENCES terminal_requests (request_id) DEFERRABLE INITIALLY DEFERRED,
    revoked_at          TIMESTAMPTZ,
    CHECK ((exchanged_at IS NULL) = (exchange_request_id IS NULL))
);
CREATE INDEX exchange_certificates_open_expiry_idx ON exchange_certificates (expires_at)
    WHERE exchanged_at IS NULL AND revoked_at IS NULL;

-- Every status change of every asset, with its cause. Append-only: see the trigger below.
CREATE TABLE asset_status_history (
    id          BIGSERIAL PRIMARY KEY,
    asset_id    UUID NOT NULL REFERENCES assets (id),
    from_status TEXT,
    to_status   TEXT NOT NULL,
    cause       TEXT NOT NULL,
    detail      TEXT,
    at          TIMESTAMPTZ NOT NULL
);
CREATE INDEX asset_status_history_asset_idx ON asset_status_history (asset_id, id);

CREATE FUNCTION assetflow_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END $$;
CREATE TRIGGER asset_status_history_append_only
    BEFORE UPDATE OR DELETE ON asset_status_history
    FOR EACH ROW EXECUTE FUNCTION assetflow_refuse_change();

-- Everything sent to a terminal through its gateway: certificates, assets, messages, refusals.
CREATE TABLE deliveries (
    id            UUID PRIMARY KEY,
    -- Deterministic: what this delivery is for ("asset:<id>", "certificate:<id>", ...). Enqueueing
    -- the same thing twice hits this key instead of sending twice.
    dedupe_key    TEXT NOT NULL UNIQUE,
    kind          TEXT NOT NULL CHECK (kind IN ('certificate', 'asset', 'message', 'download_request',
                                                'revocation_request', 'refusal')),
    terminal_id   TEXT NOT NULL REFERENCES terminals (id),
    gateway_id    TEXT NOT NULL REFERENCES gateways (id),
    order_id      UUID REFERENCES orders (id),
    asset_id      UUID REFERENCES assets (id),
    -- A forced transmission or a retransmission completes the asset as force_delivered.
    forced        BOOLEAN NOT NULL DEFAULT false,
    content       JSONB NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'delivered', 'failed', 'dead', 'cancelled')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    -- When the next attempt is due (pending or failed), or when the receipt is due (sent).
    due_at        TIMESTAMPTZ NOT NULL,
    last_error    TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at  TIMESTAMPTZ
);
CREATE INDEX deliveries_due_idx ON deliveries (due_at) WHERE status IN ('pending', 'sent', 'failed');
CREATE INDEX deliveries_asset_idx ON deliveries (asset_id);
CREATE INDEX deliveries_order_idx ON deliveries (order_id);

CREATE TABLE delivery_attempts (
    delivery_id    UUID NOT NULL REFERENCES deliveries (id),
    attempt        INTEGER NOT NULL CHECK (attempt > 0),
    message_id     UUID NOT NULL UNIQUE,
    -- SHA-256 of the exact bytes published: only a receipt carrying it completes the delivery.
    payload_sha256 TEXT NOT NULL,
    sent_at        TIMESTAMPTZ NOT NULL,
    outcome        TEXT NOT NULL CHECK (outcome IN ('sent', 'acknowledged', 'hash_mismatch', 'timed_out')),
    error          TEXT,
    finished_at    TIMESTAMPTZ,
    PRIMARY KEY (delivery_id, attempt)
);

-- Messages caused by a state change, written in the same transaction and published by the relay.
CREATE TABLE outbox (
    id             BIGSERIAL PRIMARY KEY,
    message_id     UUID NOT NULL UNIQUE,
    exchange       TEXT NOT NULL,
    routing_key    TEXT NOT NULL,
    message_type   TEXT NOT NULL,
    correlation_id TEXT,
    headers        JSONB NOT NULL DEFAULT '{}'::jsonb,
    payload        BYTEA NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Not published before this time: how a handler defers a message without spending an attempt.
    available_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts       INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT
);
CREATE INDEX outbox_available_idx ON outbox (available_at, id);

-- Messages consumed and committed, per pool: a redelivered message finds its row and has no effect.
CREATE TABLE inbox (
    pool         TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    message_type TEXT NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (pool, message_id)
);
CREATE INDEX inbox_processed_idx ON inbox (processed_at);

-- Requests answered with a refusal: the rejection record, with its machine-readable reason.
CREATE TABLE refusals (
    id           UUID PRIMARY KEY,
    request_id   TEXT,
    terminal_id  TEXT,
    message_type TEXT NOT NULL,
    reason       TEXT NOT NULL,
    detail       TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX refusals_request_idx ON refusals (request_id);

-- Everything given up on, with its evidence, until an operator replays or purges it.
CREATE TABLE dead_letters (
    id           UUID PRIMARY KEY,
    pool         TEXT NOT NULL,
    source       TEXT NOT NULL CHECK (source IN ('message', 'settlement', 'delivery')),
    message_type TEXT NOT NULL,
    message_id   TEXT,
    exchange     TEXT,
    routing_key  TEXT,
    payload      BYTEA NOT NULL,
    headers      JSONB NOT NULL DEFAULT '{}'::jsonb,
    reason       TEXT NOT NULL,
    detail       TEXT NOT NULL,
    -- Each attempt: {"at": ..., "error": ...}.
    attempts     JSONB NOT NULL DEFAULT '[]'::jsonb,
    subject_id   UUID,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    replayed_at  TIMESTAMPTZ,
    replay_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX dead_letters_created_idx ON dead_letters (created_at);
CREATE UNIQUE INDEX dead_letters_message_idx ON dead_letters (pool, message_id) WHERE message_id IS NOT NULL;

-- Runs of the scheduled jobs.
CREATE TABLE job_runs (
    id            BIGSERIAL PRIMARY KEY,
    job           TEXT NOT NULL,
    as_of         TIMESTAMPTZ NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ,
    dry_run       BOOLEAN NOT NULL DEFAULT false,
    trigger       TEXT NOT NULL CHECK (trigger IN ('schedule', 'catch_up', 'manual')),
    rows_scanned  BIGINT NOT NULL DEFAULT 0,
    enqueued      BIGINT NOT NULL DEFAULT 0,
    errors        BIGINT NOT NULL DEFAULT 0,
    outcome       TEXT NOT NULL CHECK (outcome IN ('running', 'succeeded', 'failed')),
    error         TEXT
);
CREATE INDEX job_runs_job_idx ON job_runs (job, started_at DESC);
