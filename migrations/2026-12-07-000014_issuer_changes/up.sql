-- Issuer changes (docs/product.md#issuer-changes): an issuer changes an event (a new date, a
-- correction); every holder of an asset not yet delivered gets a modification notice with a reply
-- deadline, and answers accept (a new asset is issued and the old one replaced) or refund. No
-- answer by the deadline takes the issuer's default.

-- An asset replaced by a new one: final, like delivered or refunded.
ALTER TABLE assets DROP CONSTRAINT assets_status_check;
ALTER TABLE assets ADD CONSTRAINT assets_status_check CHECK (status IN (
    'awaiting_exchange', 'awaiting_designated_delivery', 'delivered',
    'expired_certificate_processing', 'retransmitting', 'forced_retransmitting',
    'force_delivered', 'expired', 'refunded', 'replaced'));
INSERT INTO status_transitions (from_status, to_status) VALUES
    ('awaiting_exchange', 'replaced'),
    ('awaiting_designated_delivery', 'replaced'),
    ('expired_certificate_processing', 'replaced'),
    ('retransmitting', 'replaced'),
    ('forced_retransmitting', 'replaced');
DROP INDEX assets_expires_idx;
CREATE INDEX assets_expires_idx ON assets (expires_at)
    WHERE status NOT IN ('delivered', 'force_delivered', 'expired', 'refunded', 'replaced');

-- The asset a replacement replaces, and which generation of the order's asset it is: the first
-- issue is generation 0, and each replacement one more.
ALTER TABLE assets ADD COLUMN replaces_asset_id UUID UNIQUE REFERENCES assets (id);
ALTER TABLE assets ADD COLUMN generation INTEGER NOT NULL DEFAULT 0 CHECK (generation >= 0);
ALTER TABLE assets DROP CONSTRAINT assets_order_id_recipient_terminal_id_ordinal_key;
ALTER TABLE assets ADD CONSTRAINT assets_order_recipient_ordinal_generation_key
    UNIQUE (order_id, recipient_terminal_id, ordinal, generation);
ALTER TABLE assets ADD CONSTRAINT assets_replacement_is_a_later_generation
    CHECK ((replaces_asset_id IS NULL) = (generation = 0));

CREATE TABLE issuer_changes (
    id             UUID PRIMARY KEY,
    product_id     TEXT NOT NULL REFERENCES products (id),
    -- What changed, for the holders: the notice's text.
    description    TEXT NOT NULL,
    reply_by       TIMESTAMPTZ NOT NULL,
    -- What an unanswered notice gets at its deadline.
    default_answer TEXT NOT NULL CHECK (default_answer IN ('accept', 'refund')),
    created_at     TIMESTAMPTZ NOT NULL
);

CREATE TABLE modification_notices (
    id          UUID PRIMARY KEY,
    change_id   UUID NOT NULL REFERENCES issuer_changes (id),
    asset_id    UUID NOT NULL REFERENCES assets (id),
    holder_terminal_id TEXT NOT NULL,
    reply_by    TIMESTAMPTZ NOT NULL,
    -- The answer, by the holder (its request) or by default at the deadline.
    answer      TEXT CHECK (answer IN ('accept', 'refund')),
    answered_by TEXT CHECK (answered_by IN ('holder', 'default')),
    request_id  TEXT UNIQUE REFERENCES terminal_requests (request_id) DEFERRABLE INITIALLY DEFERRED,
    answered_at TIMESTAMPTZ,
    -- What the answer did: the replacement issued, the refund asked for, or why nothing could be.
    outcome     TEXT,
    UNIQUE (change_id, asset_id),
    CHECK ((answer IS NULL) = (answered_at IS NULL) AND (answer IS NULL) = (answered_by IS NULL))
);
CREATE INDEX modification_notices_due_idx ON modification_notices (reply_by) WHERE answer IS NULL;
