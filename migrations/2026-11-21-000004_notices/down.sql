CREATE INDEX assets_order_idx ON assets (order_id);
ALTER TABLE asset_status_history ADD CONSTRAINT asset_status_history_asset_id_fkey FOREIGN KEY (asset_id) REFERENCES assets (id);
DROP INDEX exchange_certificates_exchange_request_idx;
ALTER TABLE exchange_certificates ADD CONSTRAINT exchange_certificates_exchange_request_id_key UNIQUE (exchange_request_id);

ALTER TABLE exchange_certificates
    ADD COLUMN reminder_stage SMALLINT CHECK (reminder_stage IN (1, 2)),
    ADD COLUMN reminder_due_at TIMESTAMPTZ,
    ADD CHECK ((reminder_stage IS NULL) = (reminder_due_at IS NULL));
UPDATE exchange_certificates c SET reminder_stage = r.next_stage, reminder_due_at = r.due_at
FROM reminder_schedule r WHERE r.certificate_id = c.id;
CREATE INDEX exchange_certificates_reminder_idx ON exchange_certificates (reminder_due_at, id)
    WHERE reminder_due_at IS NOT NULL;

CREATE TABLE certificate_reminders (
    certificate_id UUID NOT NULL REFERENCES exchange_certificates (id),
    stage          SMALLINT NOT NULL CHECK (stage IN (1, 2)),
    action         TEXT NOT NULL,
    as_of          TIMESTAMPTZ NOT NULL,
    delivery_id    UUID,
    PRIMARY KEY (certificate_id, stage)
);
INSERT INTO certificate_reminders (certificate_id, stage, action, as_of)
SELECT certificate_id, 1, stage1, now() FROM reminder_schedule WHERE stage1 IS NOT NULL
UNION ALL
SELECT certificate_id, 2, stage2, now() FROM reminder_schedule WHERE stage2 IS NOT NULL;
DROP TABLE reminder_schedule;
