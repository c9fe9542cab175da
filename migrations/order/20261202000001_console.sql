-- What the console needs: each timeline event's cause (for the saga's
-- arrows; NULL for events started by a request, and for rows written before
-- this column existed) and a customer's orders found without a scan.
ALTER TABLE order_timeline ADD COLUMN causation_id UUID;
CREATE INDEX orders_customer ON orders (customer, order_id DESC);
