-- Refunds (docs/product.md#refunds) and deferrals (docs/product.md#deferrals).
--
-- A refund is a settlement of its own kind: a `settlements` row of kind 'refund', instructed to
-- the partner that was paid and answered like a purchase, with its timeouts, retries and dead
-- letters. The `refunds` row beside it is what the refund is for (an asset, or a whole payment
-- that bought nothing) and its own state: requested -> refunded | failed.

-- An order has one purchase settlement, and any number of refunds.
ALTER TABLE settlements DROP CONSTRAINT settlements_order_id_kind_key;
CREATE UNIQUE INDEX settlements_one_purchase_per_order ON settlements (order_id) WHERE kind = 'purchase';

CREATE TABLE refunds (
    id             UUID PRIMARY KEY,
    -- The refund settlement sent to the partner.
    settlement_id  UUID NOT NULL UNIQUE REFERENCES settlements (id),
    order_id       UUID NOT NULL REFERENCES orders (id),
    -- The asset refunded; NULL when the payment bought nothing (a late `settled`).
    asset_id       UUID REFERENCES assets (id),
    -- Why: the holder asked, a change of product, an issuer's change, or a payment that settled
    -- after what it paid for was revoked.
    cause          TEXT NOT NULL CHECK (cause IN ('holder', 'change', 'issuer_change', 'late_settlement')),
    -- The holder's signed request, when one asked: its idempotency key.
    request_id     TEXT UNIQUE REFERENCES terminal_requests (request_id) DEFERRABLE INITIALLY DEFERRED,
    amount_minor   BIGINT NOT NULL CHECK (amount_minor > 0),
    currency       TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('requested', 'refunded', 'failed')),
    reason         TEXT,
    requested_at   TIMESTAMPTZ NOT NULL,
    answered_at    TIMESTAMPTZ,
    CHECK ((status = 'requested') = (answered_at IS NULL))
);
CREATE INDEX refunds_order_idx ON refunds (order_id);
-- An asset is refunded at most once, and has at most one refund under way.
CREATE UNIQUE INDEX refunds_one_per_asset ON refunds (asset_id) WHERE status IN ('requested', 'refunded');
-- A payment that bought nothing is refunded at most once.
CREATE UNIQUE INDEX refunds_one_late_per_order ON refunds (order_id)
    WHERE cause = 'late_settlement' AND status IN ('requested', 'refunded');

-- The refunds of an order never add up to more than its settled payment. Locking the payment
-- serialises two refunds of one order, so the sum each sees is the truth.
CREATE FUNCTION assetflow_refunds_within_payment() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    paid     BIGINT;
    refunded BIGINT;
BEGIN
    IF NEW.status = 'failed' THEN
        RETURN NEW;
    END IF;
    SELECT amount_minor INTO paid FROM settlements
    WHERE order_id = NEW.order_id AND kind = 'purchase' AND status = 'settled'
    FOR UPDATE;
    IF paid IS NULL THEN
        RAISE EXCEPTION 'order %: no settled payment to refund', NEW.order_id USING ERRCODE = 'check_violation';
    END IF;
    SELECT coalesce(sum(amount_minor), 0) INTO refunded FROM refunds
    WHERE order_id = NEW.order_id AND status <> 'failed' AND id <> NEW.id;
    IF refunded + NEW.amount_minor > paid THEN
        RAISE EXCEPTION 'order %: refunds of % would exceed the % paid', NEW.order_id, refunded + NEW.amount_minor, paid
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refunds_within_payment
    BEFORE INSERT OR UPDATE OF status, amount_minor ON refunds
    FOR EACH ROW EXECUTE FUNCTION assetflow_refunds_within_payment();

-- A holder may defer the download of an asset that awaits exchange: it then awaits a designated
-- delivery instead (docs/product.md#the-transition-table).
INSERT INTO status_transitions (from_status, to_status) VALUES ('awaiting_exchange', 'awaiting_designated_delivery');
