-- A receipt certificate whose payment was declined is open again, and its holder may submit it
-- again (docs/product.md#receipt-certificates-booking-and-submission): the declined order and the new one then both name
-- its reserved asset. Only one order that was not declined may.
ALTER TABLE orders DROP CONSTRAINT orders_reserved_asset_id_key;
CREATE UNIQUE INDEX orders_reserved_asset_id_key ON orders (reserved_asset_id) WHERE status <> 'declined';
