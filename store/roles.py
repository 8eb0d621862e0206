"""The roles latentbank sets up on its embedded PostgreSQL: the service's own (owning its
database, not superuser) and the superuser, their passwords sent only as SCRAM verifiers."""

from __future__ import annotations

import re
from collections.abc import Callable

_ROLE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_VERIFIER = re.compile(r"SCRAM-SHA-256\$[0-9]+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+")


def alter_password(role: str, verifier: str) -> str:
    """`ALTER ROLE … PASSWORD` with a SCRAM verifier (never a clear password)."""
    if not _ROLE.fullmatch(role) or not _VERIFIER.fullmatch(verifier):
        raise ValueError("a plain role name and a SCRAM-SHA-256 verifier are needed")
    return f"ALTER ROLE {role} WITH PASSWORD '{verifier}'"


def set_password_then_reload(dsn: str, role: str, verifier: str,
                             between: Callable[[], None]) -> None:
    """On a server that still trusts local connections: set `role`'s password, run
    `between` (the caller rewrites pg_hba.conf), then have the server reload its config."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(alter_password(role, verifier))
        between()
        conn.execute("SELECT pg_reload_conf()")


def secure_roles(superuser_dsn: str, superuser: str, superuser_verifier: str,
                 app_role: str, app_verifier: str) -> None:
    """As the superuser (psycopg.OperationalError when its password is refused): its own
    password again; `app_role` made or reset to LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
    with its password, owner of the database and of everything the superuser made in it;
    pgvector created (it is not a trusted extension); template1 closed to PUBLIC.
    Idempotent, and serialised between processes by an advisory lock."""
    import psycopg

    if not _ROLE.fullmatch(app_role) or not _VERIFIER.fullmatch(app_verifier):
        raise ValueError("a plain role name and a SCRAM-SHA-256 verifier are needed")
    with psycopg.connect(superuser_dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext('latentbank.embedded-roles'))")
        conn.execute(alter_password(superuser, superuser_verifier))
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                        (app_role,)).fetchone() is None:
            conn.execute(f"CREATE ROLE {app_role}")
        conn.execute(f"ALTER ROLE {app_role} WITH LOGIN NOSUPERUSER NOCREATEDB "
                     f"NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT "
                     f"PASSWORD '{app_verifier}'")
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(f"ALTER DATABASE postgres OWNER TO {app_role}")
        conn.execute(_GIVE_TO_APP_ROLE.format(superuser=superuser, app_role=app_role))
        conn.execute("REVOKE CONNECT, TEMPORARY ON DATABASE template1 FROM PUBLIC")


# Everything the superuser made in the database `postgres` before the service had a role of
# its own (the schema of earlier releases, made by migrations run as `postgres`) passes to
# that role. System schemas and pgvector's own objects (extension members) stay; a
# column's sequence and a table's indexes follow their table.
_NOT_SYSTEM = "n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'"


def _hand_over(select: str, catalog: str, alias: str, deptypes: str, alter: str) -> str:
    """One loop of the hand-over: each object `select` finds that is no extension's member
    (nor, for `deptypes` a/i, a table's index or a column's sequence) gets `alter`."""
    return f"""
    FOR item IN
        {select}
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{catalog}'::regclass
                          AND d.objid = {alias}.oid AND d.deptype {deptypes})
    LOOP
        EXECUTE {alter};
    END LOOP;"""


_GIVE_TO_APP_ROLE = "DO $$ DECLARE item record; BEGIN" + "".join([
    _hand_over("SELECT n.nspname FROM pg_namespace n WHERE n.nspowner = '{superuser}'::regrole "
               f"AND {_NOT_SYSTEM}", "pg_namespace", "n", "= 'e'",
               "format('ALTER SCHEMA %I OWNER TO {app_role}', item.nspname)"),
    _hand_over("SELECT c.oid::regclass AS name, c.relkind FROM pg_class c JOIN pg_namespace n "
               "ON n.oid = c.relnamespace WHERE c.relowner = '{superuser}'::regrole AND "
               f"c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND {_NOT_SYSTEM}",
               "pg_class", "c", "IN ('e', 'a', 'i')",
               "format('ALTER %s %s OWNER TO {app_role}', CASE item.relkind "
               "WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE' "
               "WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, item.name)"),
    _hand_over("SELECT t.oid::regtype AS name, t.typtype FROM pg_type t JOIN pg_namespace n "
               "ON n.oid = t.typnamespace WHERE t.typowner = '{superuser}'::regrole AND "
               f"t.typtype IN ('e', 'd', 'r') AND {_NOT_SYSTEM}", "pg_type", "t", "= 'e'",
               "format('ALTER %s %s OWNER TO {app_role}', CASE item.typtype "
               "WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, item.name)"),
    _hand_over("SELECT p.oid::regprocedure AS name FROM pg_proc p JOIN pg_namespace n "
               "ON n.oid = p.pronamespace WHERE p.proowner = '{superuser}'::regrole AND "
               f"{_NOT_SYSTEM}", "pg_proc", "p", "= 'e'",
               "format('ALTER ROUTINE %s OWNER TO {app_role}', item.name)"),
]) + "\nEND $$"
