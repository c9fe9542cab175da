-- Why the order's saga is stuck: a step that keeps failing (empty when none).
ALTER TABLE orders ADD COLUMN stuck TEXT NOT NULL DEFAULT '';
CREATE INDEX orders_stuck ON orders (order_id DESC) WHERE stuck <> '';
