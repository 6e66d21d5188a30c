-- The signed documents move out of the rows that change. An asset or certificate is written once
-- with its document and then changes status (exchanged, revoked, past due, expired, delivered);
-- every such change rewrote the whole row, documents and signatures included: about 940 bytes an
-- asset and 530 a certificate, most of a past-due batch's WAL. The documents never change, so
-- they live beside their rows, written once at issuance and read only to send or to check them.
CREATE TABLE asset_documents (
    asset_id           UUID PRIMARY KEY REFERENCES assets (id),
    -- The signed asset document (canonical JSON) and its two signatures.
    document           TEXT NOT NULL,
    issuer_signature   TEXT NOT NULL,
    provider_signature TEXT NOT NULL
);
INSERT INTO asset_documents (asset_id, document, issuer_signature, provider_signature)
SELECT id, document, issuer_signature, provider_signature FROM assets;
ALTER TABLE assets DROP COLUMN document, DROP COLUMN issuer_signature, DROP COLUMN provider_signature;

CREATE TABLE certificate_documents (
    certificate_id UUID PRIMARY KEY REFERENCES exchange_certificates (id),
    -- The signed certificate (canonical JSON) and its signature.
    document       TEXT NOT NULL,
    signature      TEXT NOT NULL
);
INSERT INTO certificate_documents (certificate_id, document, signature)
SELECT id, document, signature FROM exchange_certificates;
ALTER TABLE exchange_certificates DROP COLUMN document, DROP COLUMN signature;

-- Rows written before this migration keep the dropped bytes until they next change (or until an
-- operator runs VACUUM FULL on the two tables, which cannot run inside a migration).
