ALTER TABLE deliveries DROP CONSTRAINT deliveries_kind_check;
DELETE FROM delivery_attempts a USING deliveries d WHERE a.delivery_id = d.id AND d.kind = 'receipt_certificate';
DELETE FROM deliveries WHERE kind = 'receipt_certificate';
ALTER TABLE deliveries ADD CONSTRAINT deliveries_kind_check CHECK (kind IN (
    'certificate', 'asset', 'message', 'download_request', 'revocation_request', 'refusal',
    'confirmation_request'));
DROP TABLE booking_decisions;
DROP TABLE receipt_certificates;
ALTER TABLE orders DROP COLUMN reserved_asset_id;
DROP TABLE booking_terms;
