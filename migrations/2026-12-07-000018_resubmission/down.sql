DROP INDEX orders_reserved_asset_id_key;
ALTER TABLE orders ADD CONSTRAINT orders_reserved_asset_id_key UNIQUE (reserved_asset_id);
