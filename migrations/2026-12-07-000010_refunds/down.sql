DELETE FROM status_transitions WHERE from_status = 'awaiting_exchange' AND to_status = 'awaiting_designated_delivery';
DROP TRIGGER refunds_within_payment ON refunds;
DROP FUNCTION assetflow_refunds_within_payment();
DROP TABLE refunds;
DROP INDEX settlements_one_purchase_per_order;
ALTER TABLE settlements ADD CONSTRAINT settlements_order_id_kind_key UNIQUE (order_id, kind);
