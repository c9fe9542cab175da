-- When a terminal order's contact address was erased (PERSONAL_DATA_RETENTION_DAYS).
ALTER TABLE orders ADD COLUMN erased_at TIMESTAMPTZ;
CREATE INDEX orders_to_erase ON orders (updated_at)
    WHERE erased_at IS NULL AND status IN ('COMPLETED', 'CANCELLED');
