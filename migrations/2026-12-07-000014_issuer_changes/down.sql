DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM assets WHERE generation > 0 OR status = 'replaced') THEN
        RAISE EXCEPTION 'assets were replaced by issuer changes: undoing this migration would lose them';
    END IF;
END $$;
DROP TABLE modification_notices;
DROP TABLE issuer_changes;
ALTER TABLE assets DROP CONSTRAINT assets_replacement_is_a_later_generation;
ALTER TABLE assets DROP CONSTRAINT assets_order_recipient_ordinal_generation_key;
ALTER TABLE assets ADD CONSTRAINT assets_order_id_recipient_terminal_id_ordinal_key
    UNIQUE (order_id, recipient_terminal_id, ordinal);
ALTER TABLE assets DROP COLUMN generation;
ALTER TABLE assets DROP COLUMN replaces_asset_id;
DROP INDEX assets_expires_idx;
CREATE INDEX assets_expires_idx ON assets (expires_at)
    WHERE status NOT IN ('delivered', 'force_delivered', 'expired', 'refunded');
DELETE FROM status_transitions WHERE to_status = 'replaced';
ALTER TABLE assets DROP CONSTRAINT assets_status_check;
ALTER TABLE assets ADD CONSTRAINT assets_status_check CHECK (status IN (
    'awaiting_exchange', 'awaiting_designated_delivery', 'delivered',
    'expired_certificate_processing', 'retransmitting', 'forced_retransmitting',
    'force_delivered', 'expired', 'refunded'));
