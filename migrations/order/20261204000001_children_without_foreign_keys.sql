-- An order's lines, status changes and timeline are written only by
-- statements that select the order's row they have just inserted or locked
-- (store.rs), and no order is ever deleted, so the foreign keys checked
-- nothing the code does not already ensure. Each one cost a trigger and a
-- key-share lookup of the order for every line, change and timeline row:
-- about eleven per saga.
ALTER TABLE order_lines DROP CONSTRAINT order_lines_order_id_fkey;
ALTER TABLE order_status_changes DROP CONSTRAINT order_status_changes_order_id_fkey;
ALTER TABLE order_timeline DROP CONSTRAINT order_timeline_order_id_fkey;
