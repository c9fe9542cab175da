\set sku random(1, 1000)
WITH i AS (INSERT INTO inbox (event_id) VALUES (gen_random_uuid()) RETURNING event_id), u AS (UPDATE stock SET available = available - 1 WHERE sku = :sku AND available > 0 AND EXISTS (SELECT 1 FROM i) RETURNING sku) INSERT INTO outbox (event_id, payload) SELECT gen_random_uuid(), '\x0102030405060708' FROM i, u;
