ALTER TABLE deliveries DROP CONSTRAINT deliveries_kind_check;
DELETE FROM delivery_attempts a USING deliveries d WHERE a.delivery_id = d.id AND d.kind = 'confirmation_request';
DELETE FROM deliveries WHERE kind = 'confirmation_request';
ALTER TABLE deliveries ADD CONSTRAINT deliveries_kind_check
    CHECK (kind IN ('certificate', 'asset', 'message', 'download_request', 'revocation_request', 'refusal'));
DROP INDEX orders_confirm_due_idx;
ALTER TABLE orders
    DROP CONSTRAINT orders_confirmed_by_request,
    DROP CONSTRAINT orders_confirming_has_due,
    DROP COLUMN confirmation_request_id,
    DROP COLUMN confirmed_at,
    DROP COLUMN confirm_due_at;
-- Orders still waiting for their payer, or that it never confirmed, were never charged.
UPDATE orders SET status = 'declined', status_reason = 'unconfirmed' WHERE status IN ('confirming', 'unconfirmed');
ALTER TABLE orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('settling', 'issuing', 'issued', 'declined', 'failed'));
ALTER TABLE terminals DROP COLUMN waives_confirmation;
ALTER TABLE products DROP COLUMN confirmation_waived, DROP COLUMN confirmation_window_secs;
