-- Messages leave after the handler's transaction commits, not inside it.
-- The handler queues a row (PENDING) with everything needed to send it; the
-- dispatcher sends due rows one at a time and, in the transaction that marks
-- the row SENT or FAILED, writes the saga event that follows. A confirmation
-- still PENDING when the order is compensated is WITHDRAWN: the customer
-- never hears of it. A crash between the provider's answer and the commit
-- sends again with the same notification id (the provider's idempotency key).
ALTER TABLE notifications
    ADD COLUMN status          TEXT        NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'SENT', 'WITHDRAWN', 'FAILED')),
    ADD COLUMN customer        TEXT        NOT NULL DEFAULT '',
    ADD COLUMN body            TEXT        NOT NULL DEFAULT '',
    -- The envelope of the event that asked for the message: the cause of the
    -- event the dispatcher writes, and the trace it continues.
    ADD COLUMN cause           BYTEA,
    ADD COLUMN queued_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN attempts        INT         NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN last_error      TEXT;

-- Rows written before this migration were sent in the handler's transaction.
UPDATE notifications SET status = 'SENT', queued_at = sent_at;

ALTER TABLE notifications
    ALTER COLUMN sent_at DROP NOT NULL,
    ALTER COLUMN sent_at DROP DEFAULT;

CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'PENDING';
