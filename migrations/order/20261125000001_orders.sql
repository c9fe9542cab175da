-- The order service's own state: orders, their lines, every status change
-- (for WatchOrder) and the timeline of saga events that concern each order.
CREATE TABLE orders (
    order_id        UUID        PRIMARY KEY,
    customer        TEXT        NOT NULL,
    destination     TEXT        NOT NULL,
    contact         TEXT        NOT NULL,
    status          TEXT        NOT NULL,
    reason          TEXT        NOT NULL DEFAULT '',
    idempotency_key TEXT        NOT NULL UNIQUE,
    fingerprint     TEXT        NOT NULL,
    changes         INT         NOT NULL DEFAULT 0,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    deadline_at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX orders_status ON orders (status, order_id DESC);
CREATE INDEX orders_open_deadline ON orders (deadline_at)
    WHERE status IN ('PENDING', 'RESERVED', 'SCHEDULED');

CREATE TABLE order_lines (
    order_id UUID NOT NULL REFERENCES orders (order_id),
    line_no  INT  NOT NULL,
    sku      TEXT NOT NULL,
    quantity INT  NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, line_no)
);

CREATE TABLE order_status_changes (
    order_id UUID        NOT NULL REFERENCES orders (order_id),
    seq      INT         NOT NULL,
    status   TEXT        NOT NULL,
    reason   TEXT        NOT NULL,
    at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, seq)
);

CREATE TABLE order_timeline (
    event_id    UUID        PRIMARY KEY,
    order_id    UUID        NOT NULL REFERENCES orders (order_id),
    event_type  TEXT        NOT NULL,
    producer    TEXT        NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    detail      TEXT        NOT NULL
);
CREATE INDEX order_timeline_order ON order_timeline (order_id, occurred_at);
