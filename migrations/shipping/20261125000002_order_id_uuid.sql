-- Order ids are UUIDs everywhere (the order service's own type), not text.
ALTER TABLE shipments ALTER COLUMN order_id TYPE UUID USING order_id::uuid;
