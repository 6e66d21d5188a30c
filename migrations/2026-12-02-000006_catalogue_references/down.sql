ALTER TABLE exchange_certificates
    ADD CONSTRAINT exchange_certificates_holder_terminal_id_fkey FOREIGN KEY (holder_terminal_id) REFERENCES terminals (id);
ALTER TABLE assets
    ADD CONSTRAINT assets_recipient_terminal_id_fkey FOREIGN KEY (recipient_terminal_id) REFERENCES terminals (id),
    ADD CONSTRAINT assets_product_id_fkey FOREIGN KEY (product_id) REFERENCES products (id),
    ADD CONSTRAINT assets_holder_terminal_id_fkey FOREIGN KEY (holder_terminal_id) REFERENCES terminals (id);
ALTER TABLE settlements
    ADD CONSTRAINT settlements_partner_id_fkey FOREIGN KEY (partner_id) REFERENCES partners (id),
    ADD CONSTRAINT settlements_payer_terminal_id_fkey FOREIGN KEY (payer_terminal_id) REFERENCES terminals (id);
ALTER TABLE orders
    ADD CONSTRAINT orders_orderer_terminal_id_fkey FOREIGN KEY (orderer_terminal_id) REFERENCES terminals (id),
    ADD CONSTRAINT orders_payer_terminal_id_fkey FOREIGN KEY (payer_terminal_id) REFERENCES terminals (id),
    ADD CONSTRAINT orders_product_id_fkey FOREIGN KEY (product_id) REFERENCES products (id);
ALTER TABLE terminal_requests
    ADD CONSTRAINT terminal_requests_terminal_id_fkey FOREIGN KEY (terminal_id) REFERENCES terminals (id);
