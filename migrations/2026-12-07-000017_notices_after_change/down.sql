DROP INDEX issuer_changes_product_idx;
ALTER TABLE modification_notices DROP COLUMN issued_after_change;
