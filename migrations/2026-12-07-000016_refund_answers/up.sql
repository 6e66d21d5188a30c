-- The refunds of an order never add up to more than its settled payment (migration 000010). Only
-- a refund that comes to count, or counts for more, can break that: a new one, one that failed
-- and counts again, one whose amount grows. A partner's answer (requested -> refunded, or ->
-- failed) cannot, and is no longer checked: the check locks the payment and sums the order's
-- refunds, for every answer, for nothing.
DROP TRIGGER refunds_within_payment ON refunds;
CREATE TRIGGER refunds_within_payment
    BEFORE INSERT ON refunds
    FOR EACH ROW WHEN (NEW.status <> 'failed')
    EXECUTE FUNCTION assetflow_refunds_within_payment();
CREATE TRIGGER refunds_within_payment_again
    BEFORE UPDATE OF status, amount_minor ON refunds
    FOR EACH ROW WHEN (NEW.status <> 'failed' AND (OLD.status = 'failed' OR NEW.amount_minor > OLD.amount_minor))
    EXECUTE FUNCTION assetflow_refunds_within_payment();
