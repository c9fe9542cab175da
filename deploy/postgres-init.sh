#!/bin/sh
# docker-compose's PostgreSQL runs this once, on an empty data folder: the
# roles and databases of deploy/postgres-init.sql, with each service's
# password from the environment (ORDER_DB_PASSWORD, ...). A missing one stops
# the initialisation instead of creating a role without a password.
set -eu
psql --username "$POSTGRES_USER" --dbname postgres \
    -v ON_ERROR_STOP=1 \
    -v order_password="${ORDER_DB_PASSWORD:?}" \
    -v inventory_password="${INVENTORY_DB_PASSWORD:?}" \
    -v shipping_password="${SHIPPING_DB_PASSWORD:?}" \
    -v notification_password="${NOTIFICATION_DB_PASSWORD:?}" \
    -f /etc/saga/postgres-init.sql
