"""Session-scoped real servers. PostgreSQL+pgvector comes from pgserver, owned by this
process only (workers and other processes get the URL)."""

import uuid
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    from store.db import start_embedded_postgres

    server, url = start_embedded_postgres(Path(tmp_path_factory.mktemp("pg")) / "data")
    yield url
    server.cleanup()


@pytest.fixture(scope="session")
def new_database(pg_server):
    """A factory of fresh, empty databases on the test server."""
    from sqlalchemy import create_engine, text

    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    made = []

    def make(prefix="t"):
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return pg_server.replace("/postgres?", f"/{name}?")

    yield make
    admin.dispose()


@pytest.fixture(scope="session")
def db_url(new_database):
    from store.db import migrate

    url = new_database("latentbank")
    migrate(url)
    return url


@pytest.fixture(scope="session")
def db(db_url):
    from store.db import Database

    database = Database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def settings(tmp_path):
    from store.settings import Settings

    (tmp_path / "allowed").mkdir()
    return Settings(data_dir=tmp_path / "data", allowed_roots=[tmp_path / "allowed"],
                    exact_search_below=10_000)


@pytest.fixture
def artifacts(tmp_path):
    from store.artifacts import ArtifactStore

    return ArtifactStore((tmp_path / "artifacts").as_uri())
