-- Notification's own state: every message sent (at most one of each kind per
-- order), and what happened when a customer could not be reached.
CREATE TABLE notifications (
    notification_id UUID        PRIMARY KEY,
    order_id        TEXT        NOT NULL,
    kind            TEXT        NOT NULL CHECK (kind IN ('CONFIRMATION', 'CANCELLATION')),
    recipient       TEXT        NOT NULL,
    channel         TEXT        NOT NULL,
    sent_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (order_id, kind)
);

CREATE TABLE notification_failures (
    order_id  TEXT        PRIMARY KEY,
    reason    TEXT        NOT NULL,
    failed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
