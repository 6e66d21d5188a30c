-- Changes of product (docs/product.md#changes): a refund plus a new purchase, as one process
-- with a stored step, so that it is resumed wherever it stopped and never left half done.
--
--   purchasing   the new product is being paid for (its order settling)
--   refunding    paid; the old asset is being refunded
--   done         both settled: the new order is handed to issuance, and its asset is issued and
--                delivered as a purchase's
--   failed       the new purchase was declined: nothing was done
--   compensating the old asset could not be refunded: the new payment is being refunded
--   compensated  the new payment came back: nothing is left done
--   stuck        the partner refused to give the new payment back: an operator must act
CREATE TABLE changes (
    id                 UUID PRIMARY KEY,
    request_id         TEXT NOT NULL UNIQUE REFERENCES terminal_requests (request_id) DEFERRABLE INITIALLY DEFERRED,
    asset_id           UUID NOT NULL REFERENCES assets (id),
    holder_terminal_id TEXT NOT NULL,
    new_product_id     TEXT NOT NULL REFERENCES products (id),
    new_order_id       UUID NOT NULL UNIQUE REFERENCES orders (id),
    refund_id          UUID UNIQUE REFERENCES refunds (id),
    compensation_id    UUID UNIQUE REFERENCES refunds (id),
    step               TEXT NOT NULL CHECK (step IN ('purchasing', 'refunding', 'done', 'failed', 'compensating',
                                                     'compensated', 'stuck')),
    reason             TEXT,
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL,
    CHECK (step NOT IN ('refunding', 'done') OR refund_id IS NOT NULL),
    CHECK (step NOT IN ('compensating', 'compensated', 'stuck') OR compensation_id IS NOT NULL)
);
-- An asset has at most one change under way.
CREATE UNIQUE INDEX changes_one_live_per_asset ON changes (asset_id)
    WHERE step IN ('purchasing', 'refunding', 'compensating');
CREATE INDEX changes_live_idx ON changes (updated_at) WHERE step IN ('purchasing', 'refunding', 'compensating');
