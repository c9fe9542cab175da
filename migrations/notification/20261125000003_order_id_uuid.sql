-- Order ids are UUIDs everywhere (the order service's own type), not text.
ALTER TABLE notifications ALTER COLUMN order_id TYPE UUID USING order_id::uuid;
ALTER TABLE notification_failures ALTER COLUMN order_id TYPE UUID USING order_id::uuid;
