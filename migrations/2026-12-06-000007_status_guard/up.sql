-- An asset's status changes only through its history (docs/product.md#only-the-status-machine-changes-a-status).
--
-- The status module appends the move to asset_status_history; the trigger below makes the move:
-- it checks the transition against status_transitions, and changes the asset only if it is still
-- in the status the move starts from (a compare-and-set; otherwise the entry is not written and
-- nothing moves). A direct UPDATE of assets.status, from anywhere else, is refused.

-- The transition table, as src/domain/status.rs `allowed` states it (a test keeps the two equal).
CREATE TABLE status_transitions (
    from_status TEXT NOT NULL,
    to_status   TEXT NOT NULL,
    PRIMARY KEY (from_status, to_status)
);
INSERT INTO status_transitions (from_status, to_status) VALUES
    ('awaiting_exchange', 'delivered'),
    ('awaiting_exchange', 'retransmitting'),
    ('awaiting_exchange', 'expired_certificate_processing'),
    ('awaiting_exchange', 'force_delivered'),
    ('awaiting_exchange', 'forced_retransmitting'),
    ('awaiting_exchange', 'refunded'),
    ('awaiting_designated_delivery', 'delivered'),
    ('awaiting_designated_delivery', 'retransmitting'),
    ('awaiting_designated_delivery', 'expired_certificate_processing'),
    ('awaiting_designated_delivery', 'refunded'),
    ('expired_certificate_processing', 'expired'),
    ('expired_certificate_processing', 'force_delivered'),
    ('expired_certificate_processing', 'forced_retransmitting'),
    ('expired_certificate_processing', 'refunded'),
    ('retransmitting', 'expired'),
    ('retransmitting', 'force_delivered'),
    ('retransmitting', 'refunded'),
    ('forced_retransmitting', 'expired'),
    ('forced_retransmitting', 'force_delivered'),
    ('forced_retransmitting', 'refunded');

CREATE FUNCTION assetflow_status_follows_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An asset's first entry: its status was written with the asset, at issue.
    IF NEW.from_status IS NULL THEN
        RETURN NEW;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM status_transitions
                   WHERE from_status = NEW.from_status AND to_status = NEW.to_status) THEN
        RAISE EXCEPTION 'asset %: % -> % is not a legal transition', NEW.asset_id, NEW.from_status, NEW.to_status
            USING ERRCODE = 'check_violation';
    END IF;
    UPDATE assets SET status = NEW.to_status, status_changed_at = NEW.at
    WHERE id = NEW.asset_id AND status = NEW.from_status;
    IF NOT FOUND THEN
        RETURN NULL;  -- another change won: nothing moves, and nothing is recorded
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER asset_status_history_moves_the_asset
    BEFORE INSERT ON asset_status_history
    FOR EACH ROW EXECUTE FUNCTION assetflow_status_follows_history();

CREATE FUNCTION assetflow_status_only_through_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Depth 1: an UPDATE of assets itself. Depth 2: the history's trigger above, making a move.
    IF NEW.status IS DISTINCT FROM OLD.status AND pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'asset %: % -> % refused: a status changes only through asset_status_history (the status module)',
            OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER assets_status_only_through_history
    BEFORE UPDATE OF status ON assets
    FOR EACH ROW EXECUTE FUNCTION assetflow_status_only_through_history();
