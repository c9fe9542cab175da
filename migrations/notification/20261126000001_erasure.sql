-- When a settled message's recipient and body were erased (PERSONAL_DATA_RETENTION_DAYS).
ALTER TABLE notifications ADD COLUMN erased_at TIMESTAMPTZ;
