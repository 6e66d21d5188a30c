CREATE INDEX assets_designated_idx ON assets (designated_at) WHERE status = 'awaiting_designated_delivery';
ALTER TABLE deliveries
    ADD CONSTRAINT deliveries_terminal_id_fkey FOREIGN KEY (terminal_id) REFERENCES terminals (id),
    ADD CONSTRAINT deliveries_gateway_id_fkey FOREIGN KEY (gateway_id) REFERENCES gateways (id),
    ADD CONSTRAINT deliveries_order_id_fkey FOREIGN KEY (order_id) REFERENCES orders (id),
    ADD CONSTRAINT deliveries_asset_id_fkey FOREIGN KEY (asset_id) REFERENCES assets (id);
DROP INDEX exchange_certificates_reminder_idx;
ALTER TABLE exchange_certificates DROP COLUMN reminder_due_at, DROP COLUMN reminder_stage;
