-- sendgate's two database roles. Run once, as a superuser, before the first
-- `sendgate migrate`:
--
--   psql -v database=sendgate -v owner_password=... -v app_password=... -f roles.sql
--
-- sendgate_owner owns the database and its schema; `sendgate migrate` runs
--   as it (and re-grants the runtime role's privileges every time).
-- sendgate_app runs `sendgate run` with `[database] migrate_on_start =
--   false`: SELECT, INSERT and UPDATE on the tables the gate writes, SELECT
--   and INSERT on the append-only credit ledger, DELETE on refusals,
--   published events and confirmed forward batches past their retention,
--   EXECUTE on the three retention functions (rotate_reservation_ring,
--   remove_released_reservations, purge_released_kept), SELECT on the
--   window `sendgate migrate` stores (retention_settings), nothing else. It
--   cannot create, alter or drop anything, nor update or delete a ledger
--   row, nor change the retention window.
-- Idempotent: run it again to change nothing.

\set ON_ERROR_STOP on

-- A role that exists already (or is being created by another run) is kept.
SELECT format(
    $f$DO $d$ BEGIN CREATE ROLE %I LOGIN PASSWORD %L;
       EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $d$$f$,
    name, password)
FROM (VALUES ('sendgate_owner', :'owner_password'), ('sendgate_app', :'app_password'))
     AS r(name, password)
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.name) \gexec

SELECT format('CREATE DATABASE %I OWNER sendgate_owner', :'database')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'database') \gexec

SELECT format('ALTER DATABASE %I OWNER TO sendgate_owner', :'database') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'database') \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO sendgate_owner, sendgate_app', :'database') \gexec

\connect :database
-- Only the owner creates objects; the runtime role may use them.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO sendgate_owner;
GRANT USAGE ON SCHEMA public TO sendgate_app;
