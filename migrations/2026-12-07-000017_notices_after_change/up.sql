-- An order placed before an issuer's change and issued after it gets an asset that carries the
-- change already. Its holder is still sent the change's notice, to keep the asset (accept, which
-- then replaces nothing) or take a refund (docs/product.md#issuer-changes).
ALTER TABLE modification_notices ADD COLUMN issued_after_change BOOLEAN NOT NULL DEFAULT false;

-- Issuance looks up the open changes of the products it issues.
CREATE INDEX issuer_changes_product_idx ON issuer_changes (product_id, reply_by);
