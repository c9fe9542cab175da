-- How many WatchOrder streams follow each order, so a status change notifies
-- only an order somebody watches. A NOTIFY takes PostgreSQL's cluster-wide
-- notify lock from before the commit until after its WAL flush: every
-- notifying commit of the whole server waits for the one before it, so an
-- unconditional NOTIFY per status change caps the system's commit rate.
-- A watcher that crashed leaves its count behind: it costs that order's
-- later changes a NOTIFY, nothing more.
ALTER TABLE orders ADD COLUMN watchers INT NOT NULL DEFAULT 0;
