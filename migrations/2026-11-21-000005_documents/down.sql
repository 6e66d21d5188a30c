ALTER TABLE exchange_certificates ADD COLUMN document TEXT, ADD COLUMN signature TEXT;
UPDATE exchange_certificates c SET document = d.document, signature = d.signature
FROM certificate_documents d WHERE d.certificate_id = c.id;
ALTER TABLE exchange_certificates ALTER COLUMN document SET NOT NULL, ALTER COLUMN signature SET NOT NULL;
DROP TABLE certificate_documents;

ALTER TABLE assets ADD COLUMN document TEXT, ADD COLUMN issuer_signature TEXT, ADD COLUMN provider_signature TEXT;
UPDATE assets a SET document = d.document, issuer_signature = d.issuer_signature,
                    provider_signature = d.provider_signature
FROM asset_documents d WHERE d.asset_id = a.id;
ALTER TABLE assets ALTER COLUMN document SET NOT NULL, ALTER COLUMN issuer_signature SET NOT NULL,
                   ALTER COLUMN provider_signature SET NOT NULL;
DROP TABLE asset_documents;
