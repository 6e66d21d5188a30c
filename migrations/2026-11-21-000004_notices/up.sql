-- Near-expiry reminders get a narrow table of their own: the schedule (each open certificate's
-- next stage and when it is due) and the ledger (what each stage did), one row per certificate.
-- The scan rewrites this row, not the certificate: a ~100-byte tuple with two indexes instead of
-- the signed certificate with five, which is most of what a reminder costs the database. Each
-- (certificate, stage) is recorded here exactly once, which is what makes it happen once however
-- often and on however many processes the scan runs. What the holder is sent is made by the
-- delivery pool from `certificate.notices` messages, keyed per (certificate, stage).
CREATE TABLE reminder_schedule (
    certificate_id UUID PRIMARY KEY REFERENCES exchange_certificates (id),
    asset_id       UUID NOT NULL,
    -- The certificate's expiry, copied: certificates do not change it.
    expires_at     TIMESTAMPTZ NOT NULL,
    next_stage     SMALLINT CHECK (next_stage IN (1, 2)),
    due_at         TIMESTAMPTZ,
    -- What each stage did: stage 1 a message (or superseded when stage 2 was already due), stage 2
    -- a download request or a forced transmission.
    stage1         TEXT CHECK (stage1 IN ('message', 'superseded')),
    stage2         TEXT CHECK (stage2 IN ('download_request', 'forced_transmission')),
    CHECK ((next_stage IS NULL) = (due_at IS NULL))
);
CREATE INDEX reminder_schedule_due_idx ON reminder_schedule (due_at, certificate_id) WHERE due_at IS NOT NULL;

INSERT INTO reminder_schedule (certificate_id, asset_id, expires_at, next_stage, due_at, stage1, stage2)
SELECT c.id, c.asset_id, c.expires_at, c.reminder_stage, c.reminder_due_at,
       (SELECT action FROM certificate_reminders r WHERE r.certificate_id = c.id AND r.stage = 1),
       (SELECT action FROM certificate_reminders r WHERE r.certificate_id = c.id AND r.stage = 2)
FROM exchange_certificates c;

DROP TABLE certificate_reminders;
ALTER TABLE exchange_certificates DROP COLUMN reminder_stage, DROP COLUMN reminder_due_at;

-- Only exchanged certificates have an exchange request: a partial unique index keeps the rule
-- without an index entry for every open certificate.
ALTER TABLE exchange_certificates DROP CONSTRAINT exchange_certificates_exchange_request_id_key;
CREATE UNIQUE INDEX exchange_certificates_exchange_request_idx ON exchange_certificates (exchange_request_id)
    WHERE exchange_request_id IS NOT NULL;

-- The status history is written only by the status machine, in the statement that has just
-- updated (and so locked) the asset it names; its foreign key was a trigger call per row of every
-- set-based status change (a third of a past-due batch's history insert).
ALTER TABLE asset_status_history DROP CONSTRAINT asset_status_history_asset_id_fkey;

-- The unique key (order_id, recipient_terminal_id, ordinal) already serves lookups by order:
-- this index only cost every asset insert and status change an entry.
DROP INDEX assets_order_idx;

