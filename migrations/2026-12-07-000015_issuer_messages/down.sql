ALTER TABLE issuer_changes
    DROP CONSTRAINT issuer_changes_an_issuers_change_has_its_reference,
    DROP CONSTRAINT issuer_changes_issuer_reference_key,
    DROP COLUMN reference,
    DROP COLUMN issuer_id,
    DROP COLUMN announced_by;
DROP TABLE issuers;
