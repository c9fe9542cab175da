-- Inventory's own state: stock per SKU and what each order holds.
CREATE TABLE stock (
    sku       TEXT   PRIMARY KEY,
    available BIGINT NOT NULL CHECK (available >= 0),
    reserved  BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0)
);

-- One row per order inventory has heard of: HELD, REJECTED, RELEASED or NEVER_MADE.
CREATE TABLE reservations (
    order_id   TEXT        PRIMARY KEY,
    status     TEXT        NOT NULL,
    reason     TEXT        NOT NULL DEFAULT '',
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE reservation_lines (
    order_id TEXT   NOT NULL REFERENCES reservations (order_id),
    sku      TEXT   NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, sku)
);
