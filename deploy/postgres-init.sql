-- One database and one login role per service. Each role owns its own
-- database (its migrations create the tables at start), is not a superuser,
-- and can connect to no other service's database: CONNECT is revoked from
-- PUBLIC, which every role is a member of.
--
-- Run by psql with one variable per service, <service>_password:
-- docker-compose runs deploy/postgres-init.sh, which passes them from the
-- environment; the test harness runs this same file with its own.
\set ON_ERROR_STOP on

CREATE ROLE "order" LOGIN PASSWORD :'order_password';
CREATE DATABASE "order" OWNER "order";
REVOKE ALL ON DATABASE "order" FROM PUBLIC;

CREATE ROLE inventory LOGIN PASSWORD :'inventory_password';
CREATE DATABASE inventory OWNER inventory;
REVOKE ALL ON DATABASE inventory FROM PUBLIC;

CREATE ROLE shipping LOGIN PASSWORD :'shipping_password';
CREATE DATABASE shipping OWNER shipping;
REVOKE ALL ON DATABASE shipping FROM PUBLIC;

CREATE ROLE notification LOGIN PASSWORD :'notification_password';
CREATE DATABASE notification OWNER notification;
REVOKE ALL ON DATABASE notification FROM PUBLIC;
