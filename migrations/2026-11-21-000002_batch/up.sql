-- The batch side: the near-expiry reminder ledger, per-row attempt limits (a replayed dead letter
-- gets a fresh budget), and the audit of what operators did to dead letters.

-- Each (certificate, stage) is sent at most once, however often and on however many processes
-- the near_expiry scan runs: this primary key is what makes that true.
CREATE TABLE certificate_reminders (
    certificate_id UUID NOT NULL REFERENCES exchange_certificates (id),
    stage          SMALLINT NOT NULL CHECK (stage IN (1, 2)),
    -- download_request, forced_transmission, message; or superseded when stage 2 was already due.
    action         TEXT NOT NULL,
    as_of          TIMESTAMPTZ NOT NULL,
    delivery_id    UUID,
    PRIMARY KEY (certificate_id, stage)
);

-- The attempts allowed in all; NULL means the policy in workers/. A replay raises it.
ALTER TABLE deliveries ADD COLUMN attempt_limit INTEGER CHECK (attempt_limit > 0);
ALTER TABLE settlements ADD COLUMN attempt_limit INTEGER CHECK (attempt_limit > 0);

-- What operators did to dead letters: replays and purges, with who and why.
CREATE TABLE dead_letter_audit (
    id             BIGSERIAL PRIMARY KEY,
    dead_letter_id UUID NOT NULL,
    action         TEXT NOT NULL CHECK (action IN ('replay', 'purge')),
    operator       TEXT NOT NULL,
    note           TEXT,
    at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A purged dead letter's row is gone: its summary stays here.
    summary        JSONB NOT NULL
);
CREATE INDEX dead_letter_audit_letter_idx ON dead_letter_audit (dead_letter_id);

CREATE INDEX dead_letters_pool_reason_idx ON dead_letters (pool, reason, created_at);
-- The past-due and near-expiry scans walk open certificates by expiry.
CREATE INDEX exchange_certificates_open_idx ON exchange_certificates (expires_at, id)
    WHERE exchanged_at IS NULL AND revoked_at IS NULL;
DROP INDEX exchange_certificates_open_expiry_idx;
