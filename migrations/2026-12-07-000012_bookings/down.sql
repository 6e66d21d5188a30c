ALTER TABLE deliveries DROP CONSTRAINT deliveries_kind_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_kind_check CHECK (kind IN (
    'certificate', 'asset', 'message', 'download_request', 'revocation_request', 'refusal'));
DROP TABLE booking_decisions;
DROP TABLE receipt_certificates;
ALTER TABLE orders DROP COLUMN reserved_asset_id;
DROP TABLE booking_terms;
