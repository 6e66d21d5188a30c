-- Who may answer for a partner or a gateway, and what proves a delivery
-- (docs/security.md#who-may-answer, docs/product.md#a-round-ends-with-an-acknowledgement).

-- A partner's or gateway's registered public keys (PEM, one or more: a key being rotated in and
-- the one being rotated out). NULL: the party signs nothing, and is known by its broker user only.
ALTER TABLE partners ADD COLUMN public_key_pem TEXT;
ALTER TABLE gateways ADD COLUMN public_key_pem TEXT;

-- What a product's certificates and assets need before their delivery counts as done: 'terminal',
-- the terminal's own signed acknowledgement relayed in the receipt, or 'gateway', the gateway's
-- receipt alone (for terminals that cannot sign). Products that existed before keep what they had.
ALTER TABLE products ADD COLUMN proof_of_delivery TEXT NOT NULL DEFAULT 'gateway'
    CHECK (proof_of_delivery IN ('terminal', 'gateway'));
ALTER TABLE products ALTER COLUMN proof_of_delivery SET DEFAULT 'terminal';

-- The proof a delivered delivery has, and the terminal's acknowledgement when that is the proof.
ALTER TABLE deliveries ADD COLUMN proof TEXT CHECK (proof IN ('terminal', 'gateway'));
ALTER TABLE deliveries ADD COLUMN acknowledgement JSONB;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_terminal_proof_has_acknowledgement
    CHECK ((proof = 'terminal') = (acknowledgement IS NOT NULL));
UPDATE deliveries SET proof = 'gateway' WHERE status = 'delivered';
