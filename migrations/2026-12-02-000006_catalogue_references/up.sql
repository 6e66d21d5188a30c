-- Every order, settlement, request, asset and certificate names catalogue rows: its terminals, its
-- product, its partner. A foreign key checks each such reference with a trigger that takes a
-- FOR KEY SHARE lock on the catalogue row, and a product, a partner or a busy terminal is named
-- by every transaction at once: concurrent share locks on one row become a multixact, written to
-- the WAL and its own SLRU, on every order. That was about ten trigger calls an order, more
-- statements than the order's own writes.
--
-- The references stay as columns, and what the constraint promised still holds by
-- construction, as migration 000003 says of deliveries:
--   * every writer reads the catalogue row it names in the same transaction, and refuses the
--     request if it is missing (an unknown terminal, product or partner is a refusal, never an
--     insert);
--   * catalogue rows are never deleted: operators change terminals and products (a new key,
--     off sale), they do not remove them, and no code path deletes them.
-- The keys within an order's own graph (a settlement's order, an asset's order, a document's
-- asset, a certificate's asset) stay: their parent is written by the same or an earlier
-- transaction of the same order, so their checks never contend.
ALTER TABLE terminal_requests DROP CONSTRAINT terminal_requests_terminal_id_fkey;
ALTER TABLE orders
    DROP CONSTRAINT orders_orderer_terminal_id_fkey,
    DROP CONSTRAINT orders_payer_terminal_id_fkey,
    DROP CONSTRAINT orders_product_id_fkey;
ALTER TABLE settlements
    DROP CONSTRAINT settlements_partner_id_fkey,
    DROP CONSTRAINT settlements_payer_terminal_id_fkey;
ALTER TABLE assets
    DROP CONSTRAINT assets_recipient_terminal_id_fkey,
    DROP CONSTRAINT assets_product_id_fkey,
    DROP CONSTRAINT assets_holder_terminal_id_fkey;
ALTER TABLE exchange_certificates DROP CONSTRAINT exchange_certificates_holder_terminal_id_fkey;
