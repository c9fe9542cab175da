\set sku random(1, 1000)
BEGIN;
INSERT INTO inbox (event_id) VALUES (gen_random_uuid());
UPDATE stock SET available = available - 1 WHERE sku = :sku AND available > 0;
INSERT INTO outbox (event_id, payload) VALUES (gen_random_uuid(), '\x0102030405060708');
COMMIT;
