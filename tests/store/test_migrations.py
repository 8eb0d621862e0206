"""Alembic: upgrade from empty, downgrade and upgrade again, no drift from the ORM; the
clear refusal of a PostgreSQL without pgvector."""

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from migrations import alembic_config, migrate
from store.db import check_database, make_engine
from store.errors import DatabaseUnavailable, PgvectorMissing
from store.tables import Base
from tests.support import SYSTEM_PG, system_pg_up

TABLES = {"datasets", "items", "models", "jobs", "training_metrics", "embedding_sets",
          "latents", "api_keys", "aliases", "alias_events", "embedding_set_parts",
          "mlflow_bridges", "mlflow_runs", "mlflow_sweeps", "mlflow_aliases"}


def tables(url):
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_and_no_drift(new_database):
    url = new_database("mig")
    assert tables(url) == set()
    migrate(url)
    assert tables(url) == TABLES
    command.downgrade(alembic_config(url), "base")
    assert tables(url) == set()
    migrate(url)
    migrate(url)  # idempotent
    assert tables(url) == TABLES
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT extname FROM pg_extension WHERE extname = 'vector'")
                            ).scalar() == "vector"
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
    engine.dispose()


def test_0003_moves_the_embedding_counter_out_of_the_params_json(new_database):
    url = new_database("mig3")
    migrate(url, "0002")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (kind, params) VALUES "
            "('embed', '{\"model_id\": 1, \"done_rows\": 1234}'), ('train', '{\"epochs\": 3}')"))
    migrate(url, "0003")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT kind, items_done, params FROM jobs ORDER BY id")).all()
    assert [(k, n, p) for k, n, p in rows] == [("embed", 1234, {"model_id": 1}),
                                              ("train", 0, {"epochs": 3})]
    command.downgrade(alembic_config(url), "0002")
    with engine.connect() as conn:
        params = conn.execute(text("SELECT params FROM jobs ORDER BY id")).scalars().all()
    assert params == [{"model_id": 1, "done_rows": 1234}, {"epochs": 3}]
    engine.dispose()


@pytest.mark.skipif(not system_pg_up(), reason="no PostgreSQL on 127.0.0.1:5432")
def test_postgres_without_pgvector_is_refused_with_a_fix(tmp_path):
    with pytest.raises(PgvectorMissing) as info:
        migrate(SYSTEM_PG)
    message = str(info.value)
    assert "has no pgvector extension" in message
    assert "LATENTBANK_DATABASE_URL" in message and "pgvector" in message
    assert "secret-password" not in message  # credentials are never echoed
    engine = create_engine(SYSTEM_PG)
    with engine.connect() as conn:  # and nothing was created there
        assert conn.execute(text("SELECT to_regclass('public.latents')")).scalar() is None
    engine.dispose()


def test_unreachable_database_is_a_clear_error():
    engine = make_engine("postgresql://nobody:pw@127.0.0.1:1/none",
                         connect_args={"connect_timeout": 2})
    with pytest.raises(DatabaseUnavailable, match="cannot reach PostgreSQL at .*127.0.0.1:1"):
        check_database(engine)
    engine.dispose()


# What README tells an administrator to run for an external server (psql: `\password`
# sends a verifier; here the test sets it the same way).
EXTERNAL_ADMIN_SQL = """
CREATE ROLE {app} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE DATABASE {db} OWNER {app};
"""


def test_an_app_role_that_is_not_superuser_owns_and_migrates_the_schema(pg_server):
    """The least-privilege shape for an external server: an app role that owns its
    database but is not superuser migrates and writes; pgvector (not a trusted extension)
    is created once by an administrator, and until then migrate says so."""
    import secrets
    import uuid

    from sqlalchemy.engine import make_url

    from store.sql import scram_verifier

    suffix = uuid.uuid4().hex[:8]
    app, db = f"app_{suffix}", f"ext_{suffix}"
    password = secrets.token_urlsafe(24)
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for statement in EXTERNAL_ADMIN_SQL.format(app=app, db=db).split(";\n"):
            if statement.strip():
                conn.exec_driver_sql(statement)
        conn.exec_driver_sql(f"ALTER ROLE {app} PASSWORD '{scram_verifier(password)}'")
    admin.dispose()
    url = make_url(pg_server).set(username=app, password=password, database=db)
    url = url.render_as_string(hide_password=False)
    with pytest.raises(PgvectorMissing, match=r"CREATE EXTENSION vector;` in that database"):
        migrate(url)
    assert tables(url) == set()
    admin_db = create_engine(make_url(pg_server).set(database=db), isolation_level="AUTOCOMMIT")
    with admin_db.connect() as conn:
        conn.exec_driver_sql("CREATE EXTENSION vector")
    admin_db.dispose()
    migrate(url)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            owners = conn.execute(text(
                "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public' "
                "UNION SELECT DISTINCT viewowner FROM pg_views WHERE schemaname = 'lb_v1'"
            )).scalars().all()
            assert owners == [app]
            assert conn.execute(text("SELECT rolsuper FROM pg_roles "
                                     "WHERE rolname = current_user")).scalar() is False
            conn.execute(text("CREATE INDEX ON datasets (n_items)"))
        assert tables(url) == TABLES
    finally:
        engine.dispose()
    # `latentbank sql-role` against it: the app role needs CREATEROLE (README) and no more
    import psycopg

    from store.db import Database
    from store.sql import ensure_reader, reader_url

    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"ALTER ROLE {app} CREATEROLE")
    admin.dispose()
    database, reader, reader_password = Database(url), f"reader_{suffix}", "r" * 24
    try:
        ensure_reader(database, reader_password, reader)
    finally:
        database.dispose()
    with psycopg.connect(reader_url(url, reader_password, reader), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM datasets").fetchone() == (0,)
        conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TEMP TABLE mine (x int)")
