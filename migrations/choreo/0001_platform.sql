-- Plumbing tables owned by the platform library (tracked in _choreo_migrations,
-- apart from each service's own schema).

-- Outgoing events, written in the same transaction as the state they describe.
-- The relay publishes rows whose sent_at is NULL in seq order.
CREATE TABLE choreo_outbox (
    seq         BIGSERIAL PRIMARY KEY,
    event_id    UUID        NOT NULL UNIQUE,
    subject     TEXT        NOT NULL,
    event_type  TEXT        NOT NULL,
    saga_id     TEXT        NOT NULL,
    payload     BYTEA       NOT NULL,
    traceparent TEXT        NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at     TIMESTAMPTZ
);
CREATE INDEX choreo_outbox_unsent ON choreo_outbox (seq) WHERE sent_at IS NULL;
CREATE INDEX choreo_outbox_sent_at ON choreo_outbox (sent_at) WHERE sent_at IS NOT NULL;

-- Wake the relay when a transaction that wrote outbox rows commits.
CREATE FUNCTION choreo_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('choreo_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER choreo_outbox_notify AFTER INSERT ON choreo_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION choreo_outbox_notify();

-- Every consumed event id, inserted in the transaction of its effects.
CREATE TABLE choreo_inbox (
    event_id    UUID        PRIMARY KEY,
    event_type  TEXT        NOT NULL,
    saga_id     TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX choreo_inbox_received_at ON choreo_inbox (received_at);

-- Messages the service could not read, with the reason and the raw bytes.
CREATE TABLE choreo_dead_letter (
    id          BIGSERIAL PRIMARY KEY,
    stream      TEXT        NOT NULL,
    stream_seq  BIGINT      NOT NULL,
    subject     TEXT        NOT NULL,
    reason      TEXT        NOT NULL,
    raw         BYTEA       NOT NULL,
    parked_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (stream, stream_seq)
);

-- The compensation barrier: one row per (saga, step) once either the action
-- or its compensation has run.
CREATE TABLE choreo_barrier (
    saga_id    TEXT        NOT NULL,
    step       TEXT        NOT NULL,
    state      TEXT        NOT NULL CHECK (state IN ('done', 'compensated', 'compensated_before_action')),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step)
);
