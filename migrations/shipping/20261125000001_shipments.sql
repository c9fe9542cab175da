-- Shipping's own state: one row per order it has heard of.
-- status: SCHEDULED, FAILED, CANCELLED or NEVER_MADE.
CREATE TABLE shipments (
    order_id    TEXT        PRIMARY KEY,
    shipment_id UUID,
    status      TEXT        NOT NULL,
    carrier     TEXT        NOT NULL DEFAULT '',
    destination TEXT        NOT NULL DEFAULT '',
    reason      TEXT        NOT NULL DEFAULT '',
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
