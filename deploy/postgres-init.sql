-- One database per service; each service applies its own migrations at start.
-- docker-compose runs this on a fresh PostgreSQL; the test harness runs it on
-- the cluster it creates.
CREATE DATABASE "order";
CREATE DATABASE inventory;
CREATE DATABASE shipping;
CREATE DATABASE notification;
