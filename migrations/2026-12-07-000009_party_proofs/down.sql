ALTER TABLE deliveries DROP CONSTRAINT deliveries_terminal_proof_has_acknowledgement;
ALTER TABLE deliveries DROP COLUMN acknowledgement;
ALTER TABLE deliveries DROP COLUMN proof;
ALTER TABLE products DROP COLUMN proof_of_delivery;
ALTER TABLE gateways DROP COLUMN public_key_pem;
ALTER TABLE partners DROP COLUMN public_key_pem;
