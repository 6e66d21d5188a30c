DROP TRIGGER refunds_within_payment_again ON refunds;
DROP TRIGGER refunds_within_payment ON refunds;
CREATE TRIGGER refunds_within_payment
    BEFORE INSERT OR UPDATE OF status, amount_minor ON refunds
    FOR EACH ROW EXECUTE FUNCTION assetflow_refunds_within_payment();
