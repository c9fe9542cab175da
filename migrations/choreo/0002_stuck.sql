-- Events already reported as stuck (choreo.stuck is written once per event).
CREATE TABLE choreo_stuck (
    event_id    UUID        PRIMARY KEY,
    reported_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
