-- Order ids are UUIDs everywhere (the order service's own type), not text.
ALTER TABLE reservation_lines DROP CONSTRAINT reservation_lines_order_id_fkey;
ALTER TABLE reservations ALTER COLUMN order_id TYPE UUID USING order_id::uuid;
ALTER TABLE reservation_lines ALTER COLUMN order_id TYPE UUID USING order_id::uuid;
ALTER TABLE reservation_lines
    ADD CONSTRAINT reservation_lines_order_id_fkey FOREIGN KEY (order_id) REFERENCES reservations (order_id);
