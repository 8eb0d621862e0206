-- The database's first start (PostgreSQL images run /docker-entrypoint-initdb.d/*.sql once,
-- on an empty volume, as the superuser, in POSTGRES_DB): the role the services connect as
-- and pgvector. The role owns the database, so its public schema too (PostgreSQL 15+):
-- migrations create and alter every table as that role, which is no superuser (no
-- COPY ... TO PROGRAM, no reading other databases, no new roles). pgvector is created
-- here because only a superuser may create it; the migration's CREATE EXTENSION IF NOT
-- EXISTS then finds it. A later pgvector upgrade (ALTER EXTENSION vector UPDATE) is the
-- superuser's too.
--
-- The password comes from the environment (APP_DB_PASSWORD) and is stored as a SCRAM
-- verifier. The role is `latentbank` unless psql's variable app_role says otherwise. To
-- do the same on a server of your own, as its superuser, in the database to be used:
--     APP_DB_PASSWORD=... psql -d latentbank -f docker/postgres-init.sql
\set ON_ERROR_STOP on
\getenv app_password APP_DB_PASSWORD
\if :{?app_password}
\else
DO $$ BEGIN RAISE EXCEPTION 'set APP_DB_PASSWORD: the password of the application''s role'; END $$;
\endif
\if :{?app_role}
\else
\set app_role latentbank
\endif
SET password_encryption = 'scram-sha-256';
CREATE ROLE :"app_role" LOGIN PASSWORD :'app_password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
ALTER DATABASE :"DBNAME" OWNER TO :"app_role";
-- only the owner (and the superuser) may connect to it
REVOKE ALL ON DATABASE :"DBNAME" FROM PUBLIC;
CREATE EXTENSION IF NOT EXISTS vector;
