DROP TABLE job_runs, dead_letters, refusals, inbox, outbox, delivery_attempts, deliveries,
    asset_status_history, exchange_certificates, assets, settlements, orders, terminal_requests,
    products, terminals, gateways, partners;
DROP FUNCTION assetflow_refuse_change();
