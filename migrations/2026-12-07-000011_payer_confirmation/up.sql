-- Payer confirmation (docs/product.md#payer-confirmation): where an order's payer is not its
-- orderer, the payer's terminal confirms the order with a signed `order.confirm` before anything
-- is charged, unless the product or the payer waives it.

-- How long a payer has to answer, and whether the product needs no confirmation at all.
ALTER TABLE products
    ADD COLUMN confirmation_window_secs BIGINT NOT NULL DEFAULT 900 CHECK (confirmation_window_secs > 0),
    ADD COLUMN confirmation_waived BOOLEAN NOT NULL DEFAULT false;

-- A payer may waive confirmation for every order billed to it.
ALTER TABLE terminals ADD COLUMN waives_confirmation BOOLEAN NOT NULL DEFAULT false;

-- An order waiting for its payer is `confirming` (no settlement yet); one its payer did not answer
-- in time ends `unconfirmed`. confirm_due_at is the end of the window; confirmation_request_id is
-- the payer's `order.confirm` that answered (a confirmation or a refusal to pay), and confirmed_at
-- when it confirmed.
ALTER TABLE orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('confirming', 'settling', 'issuing', 'issued', 'declined', 'failed', 'unconfirmed'));
ALTER TABLE orders
    ADD COLUMN confirm_due_at TIMESTAMPTZ,
    ADD COLUMN confirmed_at TIMESTAMPTZ,
    ADD COLUMN confirmation_request_id TEXT UNIQUE
        REFERENCES terminal_requests (request_id) DEFERRABLE INITIALLY DEFERRED,
    ADD CONSTRAINT orders_confirming_has_due CHECK (status <> 'confirming' OR confirm_due_at IS NOT NULL),
    ADD CONSTRAINT orders_confirmed_by_request CHECK (confirmed_at IS NULL OR confirmation_request_id IS NOT NULL);

-- The confirmation_timeout job claims the overdue confirmations by this index; it holds only the
-- orders waiting for their payer.
CREATE INDEX orders_confirm_due_idx ON orders (confirm_due_at, id) WHERE status = 'confirming';

-- What a payer is asked to confirm goes to its terminal as a delivery of its own kind.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_kind_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_kind_check
    CHECK (kind IN ('certificate', 'asset', 'message', 'download_request', 'revocation_request', 'refusal',
                    'confirmation_request'));
