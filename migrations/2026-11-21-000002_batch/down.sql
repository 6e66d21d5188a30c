CREATE INDEX exchange_certificates_open_expiry_idx ON exchange_certificates (expires_at)
    WHERE exchanged_at IS NULL AND revoked_at IS NULL;
DROP INDEX exchange_certificates_open_idx;
DROP INDEX dead_letters_pool_reason_idx;
DROP TABLE dead_letter_audit;
ALTER TABLE settlements DROP COLUMN attempt_limit;
ALTER TABLE deliveries DROP COLUMN attempt_limit;
DROP TABLE certificate_reminders;
