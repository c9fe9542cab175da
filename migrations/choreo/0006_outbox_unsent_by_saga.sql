-- An outbox row is published right after its commit only when no earlier
-- row of its saga is still unsent past the relay's sweep delay; else it is
-- left to the relay, which sends both in seq order, so a saga's events do
-- not pass each other on their way to the stream (crate::outbox,
-- SEQ_TO_PUBLISH). This index finds a saga's unsent rows.
CREATE INDEX choreo_outbox_unsent_by_saga ON choreo_outbox (saga_id) WHERE sent_at IS NULL;
