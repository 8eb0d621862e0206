"""Alembic: upgrade from empty, downgrade and upgrade again, no drift from the ORM; the
clear refusal of a PostgreSQL without pgvector."""

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from migrations import alembic_config, include_object, migrate
from store.db import check_database, make_engine
from store.errors import DatabaseUnavailable, PgvectorMissing
from store.tables import Base
from tests.support import SYSTEM_PG, system_pg_up

# SQLAlchemy's reflection hands a reflected CHECK constraint of a partitioned table its
# `dialect_options` as if they were a dialect's keyword and warns it knows no dialect named
# "dialect": the library's, not a difference between the schema and the models.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Can't validate argument 'dialect_options':sqlalchemy.exc.SAWarning")

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


VIEW_ROWS = "SELECT * FROM lb_v1.latents ORDER BY set_id, item_index"


def a_dataset_and_model(conn):
    """Dataset 1 of three items (keys item-0..2) and a ready model 1 over it, by SQL (the
    schema of an older revision)."""
    conn.execute(text(
        "INSERT INTO datasets (id, name, item_shape, dtype, source_dtype, source_format, "
        "n_items, checksum, artifact_key, size_bytes, min_value, max_value, has_labels) "
        "VALUES (1, 'd', '{2}', 'float32', 'float32', 'npy', 3, 'x', 'k', 24, 0, 1, false)"))
    conn.execute(text("INSERT INTO items (dataset_id, index, key) "
                      "SELECT 1, g, 'item-' || g FROM generate_series(0, 2) g"))
    conn.execute(text("INSERT INTO models (id, dataset_id, config, status) "
                      "VALUES (1, 1, '{}', 'ready')"))


def test_0012_moves_every_sets_rows_into_its_own_partition_and_back(new_database):
    """A populated database at 0011 (two sets, one with a ready partial HNSW index, one
    without rows): after 0012 each set's rows are in its partition, unchanged, the SQL
    view answers the same, the index is owed again (on the partition, by maintenance),
    and inserts for a set without a partition are refused; the downgrade puts every row
    back in one table with its foreign key."""
    url = new_database("mig12")
    migrate(url, "0011")
    engine = create_engine(url)
    with engine.begin() as conn:
        a_dataset_and_model(conn)
        conn.execute(text(
            "INSERT INTO embedding_sets (id, model_id, dataset_id, status, dim, n_items, "
            "index_status, hnsw_ef_search) VALUES (7, 1, 1, 'ready', 2, 3, 'ready', 40), "
            "(9, 1, 1, 'ready', 2, 0, 'skipped', NULL)"))
        conn.execute(text(
            "INSERT INTO latents (set_id, item_index, dataset_id, dataset_index, mu, logvar, "
            "elbo, reconstruction, kl, log_px) SELECT 7, g, 1, g, "
            "('[' || g || ',' || -g || ']')::vector, '[0,0]', -g, -g - 1, 1, -g + 0.5 "
            "FROM generate_series(0, 2) g"))
        conn.execute(text("CREATE INDEX latents_mu_hnsw_7 ON latents USING hnsw "
                          "((mu::vector(2)) vector_l2_ops) WHERE set_id = 7"))
        before = conn.execute(text("SELECT * FROM latents ORDER BY set_id, item_index")).all()
        view = conn.execute(text(VIEW_ROWS)).all()
    assert len(before) == 3 and len(view) == 3
    migrate(url, "0012")
    with engine.begin() as conn:
        assert conn.execute(text("SELECT * FROM latents ORDER BY set_id, item_index")
                            ).all() == before
        assert conn.execute(text(VIEW_ROWS)).all() == view
        parts = conn.execute(text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'latents'::regclass "
            "ORDER BY 1")).all()
        assert parts == [("latents_set_7", "FOR VALUES IN ('7')"),
                         ("latents_set_9", "FOR VALUES IN ('9')")]
        assert conn.execute(text("SELECT count(*) FROM latents_set_7")).scalar() == 3
        assert conn.execute(text("SELECT to_regclass('latents_mu_hnsw_7')")).scalar() is None
        owed = conn.execute(text("SELECT id, index_status, index_requested_at IS NOT NULL, "
                                 "hnsw_ef_search FROM embedding_sets ORDER BY id")).all()
        assert owed == [(7, "building", True, None), (9, "skipped", False, None)]
    migrate(url)  # at the head, the partitions are data, not drift
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "include_object": include_object})
        assert compare_metadata(ctx, Base.metadata) == []
    command.downgrade(alembic_config(url), "0012")
    with pytest.raises(Exception, match="no partition of relation"), engine.begin() as conn:
        conn.execute(text("INSERT INTO latents (set_id, item_index, dataset_id, "
                          "dataset_index, mu, logvar, elbo, reconstruction, kl) "
                          "VALUES (8, 0, 1, 0, '[0,0]', '[0,0]', 0, 0, 0)"))
    with engine.begin() as conn:  # a set deleted, its partition not dropped yet
        conn.execute(text("INSERT INTO embedding_sets (id, model_id, dataset_id, status, dim, "
                          "n_items) VALUES (11, 1, 1, 'ready', 2, 1)"))
        conn.execute(text("CREATE TABLE latents_set_11 (LIKE latents INCLUDING DEFAULTS)"))
        conn.execute(text("ALTER TABLE latents ATTACH PARTITION latents_set_11 "
                          "FOR VALUES IN (11)"))
        conn.execute(text("INSERT INTO latents (set_id, item_index, dataset_id, "
                          "dataset_index, mu, logvar, elbo, reconstruction, kl) SELECT 11, "
                          "item_index, dataset_id, dataset_index, mu, logvar, elbo, "
                          "reconstruction, kl FROM latents_set_7 LIMIT 1"))
        conn.execute(text("DELETE FROM embedding_sets WHERE id = 11"))
    command.downgrade(alembic_config(url), "0011")
    with engine.begin() as conn:  # the orphan's row is not carried back
        assert conn.execute(text("SELECT * FROM latents ORDER BY set_id, item_index")
                            ).all() == before
        assert conn.execute(text(VIEW_ROWS)).all() == view
        assert conn.execute(text("SELECT relkind FROM pg_class WHERE relname = 'latents'")
                            ).scalar() == "r"
        assert conn.execute(text("SELECT to_regclass('latents_set_7')")).scalar() is None
        conn.execute(text("DELETE FROM embedding_sets WHERE id = 7"))  # the key cascades
        assert conn.execute(text("SELECT count(*) FROM latents")).scalar() == 0
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


def test_0013_keeps_vector_sets_as_they_are_and_widens_halfvec_sets_on_the_way_down(
        new_database):
    """At 0013 a vector set's rows and the view are unchanged; a halfvec set (mu_half)
    reads through the view as float32; the downgrade writes its values into mu/logvar,
    owes its index again, and the view answers the same rows."""
    url = new_database("mig13")
    migrate(url, "0012")
    engine = create_engine(url)
    with engine.begin() as conn:
        a_dataset_and_model(conn)
        conn.execute(text("INSERT INTO embedding_sets (id, model_id, dataset_id, status, dim, "
                          "n_items, index_status) VALUES (7, 1, 1, 'ready', 2, 3, 'ready')"))
        conn.execute(text("CREATE TABLE latents_set_7 (LIKE latents INCLUDING DEFAULTS)"))
        conn.execute(text("ALTER TABLE latents ATTACH PARTITION latents_set_7 "
                          "FOR VALUES IN (7)"))
        conn.execute(text(
            "INSERT INTO latents (set_id, item_index, dataset_id, dataset_index, mu, logvar, "
            "elbo, reconstruction, kl) SELECT 7, g, 1, g, ('[' || g || '.125,' || -g || ']')"
            "::vector, '[0.5,-1]', -g, -g - 1, 1 FROM generate_series(0, 2) g"))
        view = conn.execute(text(VIEW_ROWS)).all()
    migrate(url, "0013")
    with engine.begin() as conn:
        assert conn.execute(text(VIEW_ROWS)).all() == view
        assert conn.execute(text("SELECT vector_type FROM embedding_sets")).scalar() == "vector"
        # a halfvec set written as the data layer writes one (mu and logvar NULL)
        conn.execute(text("INSERT INTO embedding_sets (id, model_id, dataset_id, status, dim, "
                          "n_items, index_status, vector_type) "
                          "VALUES (8, 1, 1, 'ready', 2, 3, 'ready', 'halfvec')"))
        conn.execute(text("CREATE TABLE latents_set_8 (LIKE latents INCLUDING DEFAULTS)"))
        conn.execute(text("ALTER TABLE latents ATTACH PARTITION latents_set_8 "
                          "FOR VALUES IN (8)"))
        conn.execute(text(
            "INSERT INTO latents (set_id, item_index, dataset_id, dataset_index, mu_half, "
            "logvar_half, elbo, reconstruction, kl) SELECT 8, item_index, dataset_id, "
            "dataset_index, mu::halfvec, logvar::halfvec, elbo, reconstruction, kl "
            "FROM latents_set_7"))
        both = conn.execute(text(VIEW_ROWS)).all()
    # the values are exact in float16 (multiples of 1/8): set 8 reads as set 7 does
    assert [r[2:] for r in both if r[0] == 8] == [r[2:] for r in view]
    command.downgrade(alembic_config(url), "0012")
    with engine.begin() as conn:
        assert conn.execute(text(VIEW_ROWS)).all() == both
        owed = conn.execute(text("SELECT id, index_status FROM embedding_sets ORDER BY id"))
        assert owed.all() == [(7, "ready"), (8, "building")]
        columns = conn.execute(text(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'latents' "
            "AND column_name LIKE '%half'")).all()
        assert columns == []
    migrate(url)
