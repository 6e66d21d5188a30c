-- Issuers that send their changes themselves (docs/product.md#issuer-changes): an issuer
-- configured in [issuers] proves who it is as partners and gateways do, by its broker user, by
-- the key registered here (`assetflow parties key --issuer`), or both.
CREATE TABLE issuers (
    id             TEXT PRIMARY KEY,
    public_key_pem TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Who announced a change: an operator (`assetflow products change`) or the issuer itself
-- (`issuer.change`), whose own reference for the change makes its message idempotent.
ALTER TABLE issuer_changes
    ADD COLUMN announced_by TEXT NOT NULL DEFAULT 'operator' CHECK (announced_by IN ('operator', 'issuer')),
    ADD COLUMN issuer_id    TEXT REFERENCES issuers (id),
    ADD COLUMN reference    TEXT,
    ADD CONSTRAINT issuer_changes_issuer_reference_key UNIQUE (issuer_id, reference),
    ADD CONSTRAINT issuer_changes_an_issuers_change_has_its_reference
        CHECK ((announced_by = 'issuer') = (issuer_id IS NOT NULL AND reference IS NOT NULL));
ALTER TABLE issuer_changes ALTER COLUMN announced_by DROP DEFAULT;
