-- The terminal request a delivery answers, if it answers one: the purchase for an order's
-- certificates, assets and notices, the exchange for the asset it hands over, the refused or
-- repeated request for a refusal or a duplicate notice. The gateway matches the answer to its
-- request by it (the body's `request_id` and the AMQP correlation id).
ALTER TABLE deliveries ADD COLUMN request_id TEXT;
