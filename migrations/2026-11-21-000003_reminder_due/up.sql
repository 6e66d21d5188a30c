-- The near-expiry scan claims certificates by one index-backed predicate: each open certificate
-- carries its next reminder stage and when it is due (set at issue, advanced by the scan, cleared
-- by an exchange or a revocation). certificate_reminders stays the once-per-stage ledger.
ALTER TABLE exchange_certificates
    ADD COLUMN reminder_stage SMALLINT CHECK (reminder_stage IN (1, 2)),
    ADD COLUMN reminder_due_at TIMESTAMPTZ,
    ADD CHECK ((reminder_stage IS NULL) = (reminder_due_at IS NULL));

UPDATE exchange_certificates c
SET reminder_stage = CASE WHEN EXISTS (SELECT 1 FROM certificate_reminders r WHERE r.certificate_id = c.id) THEN 2 ELSE 1 END,
    reminder_due_at = c.expires_at - CASE WHEN EXISTS (SELECT 1 FROM certificate_reminders r WHERE r.certificate_id = c.id)
                                          THEN p.reminder_stage2_secs ELSE p.reminder_stage1_secs END * interval '1 second'
FROM assets a JOIN products p ON p.id = a.product_id
WHERE a.id = c.asset_id AND c.exchanged_at IS NULL AND c.revoked_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM certificate_reminders r WHERE r.certificate_id = c.id AND r.stage = 2);

CREATE INDEX exchange_certificates_reminder_idx ON exchange_certificates (reminder_due_at, id)
    WHERE reminder_due_at IS NOT NULL;

-- deliveries is a high-volume log written in batches by the scans. Its foreign keys cost more than
-- the rest of the insert (four trigger calls per row), and every row is written in the same
-- transaction that read what it references; the references stay as indexed columns.
ALTER TABLE deliveries
    DROP CONSTRAINT deliveries_terminal_id_fkey,
    DROP CONSTRAINT deliveries_gateway_id_fkey,
    DROP CONSTRAINT deliveries_order_id_fkey,
    DROP CONSTRAINT deliveries_asset_id_fkey;

-- Designated deliveries are found through deliveries.due_at; this index had no reader, and its
-- predicate on status kept every status change from being a HOT update.
DROP INDEX assets_designated_idx;
