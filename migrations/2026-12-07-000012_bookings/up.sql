-- Receipt certificates (docs/product.md#receipt-certificates): the right to buy, booked before
-- anything is paid, and submitted later to pay and get the asset.

-- The products sold by booking, and each one's condition: 'hold' (held until the certificate
-- expires), 'lottery' (`places` winners drawn at `decided_at`) or 'threshold' (produced only if
-- `places` applicants booked by `decided_at`). A product without a row is sold by purchase only.
CREATE TABLE booking_terms (
    product_id   TEXT PRIMARY KEY REFERENCES products (id),
    condition    TEXT NOT NULL CHECK (condition IN ('hold', 'lottery', 'threshold')),
    places       INTEGER CHECK (places > 0),
    decided_at   TIMESTAMPTZ,
    -- How long a lottery winner (or whoever a lapsed winner's place passes to) has to submit.
    window_secs  BIGINT NOT NULL DEFAULT 86400 CHECK (window_secs > 0),
    CHECK (condition = 'hold' OR (places IS NOT NULL AND decided_at IS NOT NULL))
);

-- The order a submission placed names the asset its receipt certificate reserved: it is issued
-- with that id.
ALTER TABLE orders ADD COLUMN reserved_asset_id UUID UNIQUE;

CREATE TABLE receipt_certificates (
    id                 UUID PRIMARY KEY,
    request_id         TEXT NOT NULL UNIQUE REFERENCES terminal_requests (request_id) DEFERRABLE INITIALLY DEFERRED,
    product_id         TEXT NOT NULL REFERENCES products (id),
    holder_terminal_id TEXT NOT NULL,
    payer_terminal_id  TEXT NOT NULL,
    -- The asset part: the asset this right buys, reserved at booking.
    asset_id           UUID NOT NULL UNIQUE,
    condition          TEXT NOT NULL CHECK (condition IN ('hold', 'lottery', 'threshold')),
    -- applied: awaiting its draw or its closing; open: may be submitted (until submit_by);
    -- lost: not drawn (a lottery's waiting list keeps its rank) or the threshold was not met;
    -- submitted: being settled; issued: settled, its asset issued; revoked: expired or lapsed.
    status             TEXT NOT NULL CHECK (status IN ('applied', 'open', 'lost', 'submitted', 'issued', 'revoked')),
    issued_at          TIMESTAMPTZ NOT NULL,
    expires_at         TIMESTAMPTZ NOT NULL,
    -- By when an open certificate must be submitted: its expiry, or a lottery winner's window.
    submit_by          TIMESTAMPTZ,
    -- The stage-1 reminder: due at, and whether it was sent.
    reminder_due_at    TIMESTAMPTZ,
    document           TEXT NOT NULL,
    -- A lottery applicant's place in its draw (1 = first drawn).
    rank               INTEGER,
    order_id           UUID UNIQUE REFERENCES orders (id),
    submit_request_id  TEXT UNIQUE,
    status_reason      TEXT,
    updated_at         TIMESTAMPTZ NOT NULL,
    CHECK (status <> 'open' OR submit_by IS NOT NULL),
    CHECK (status NOT IN ('submitted', 'issued') OR order_id IS NOT NULL)
);
CREATE INDEX receipt_certificates_product_idx ON receipt_certificates (product_id, status);
CREATE INDEX receipt_certificates_submit_by_idx ON receipt_certificates (submit_by) WHERE status = 'open';
CREATE INDEX receipt_certificates_expiry_idx ON receipt_certificates (expires_at)
    WHERE status IN ('applied', 'open', 'submitted');
CREATE INDEX receipt_certificates_reminder_idx ON receipt_certificates (reminder_due_at)
    WHERE reminder_due_at IS NOT NULL;

-- Each lottery's draw, published: the signed list of applicants and the seed, from which anyone
-- can rank them again (docs/product.md#lotteries).
CREATE TABLE booking_decisions (
    product_id  TEXT PRIMARY KEY REFERENCES products (id),
    condition   TEXT NOT NULL CHECK (condition IN ('lottery', 'threshold')),
    decided_at  TIMESTAMPTZ NOT NULL,
    applicants  INTEGER NOT NULL,
    outcome     TEXT NOT NULL CHECK (outcome IN ('drawn', 'produced', 'failed')),
    -- The published draw (canonical JSON, signed by the service provider): the applicants' receipt
    -- certificate ids in order, the seed and the number of places. NULL for a threshold.
    draw        TEXT
);

ALTER TABLE deliveries DROP CONSTRAINT deliveries_kind_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_kind_check CHECK (kind IN (
    'certificate', 'asset', 'message', 'download_request', 'revocation_request', 'refusal',
    'confirmation_request', 'receipt_certificate'));
