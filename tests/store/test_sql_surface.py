"""The SQL surface's contract: the views of `lb_v1` keep these columns and types across
releases (a change here is a change of the public API: make `lb_v2` instead; a release may
only append columns), and the read-only role reads the views and nothing else."""

import secrets

import psycopg
import pytest
from alembic import command
from sqlalchemy import text

from migrations import alembic_config, migrate
from store.db import Database
from store.sql import SCHEMA, ensure_reader, reader_url

FIRST_RELEASE = {
    "datasets": [("dataset_id", "bigint"), ("name", "text"), ("item_shape", "_int4"),
                 ("n_items", "bigint"), ("has_labels", "boolean"),
                 ("created_at", "timestamp with time zone")],
    "models": [("model_id", "bigint"), ("dataset_id", "bigint"), ("status", "text"),
               ("family", "text"), ("latent_dim", "integer"), ("likelihood", "text"),
               ("config", "jsonb"), ("heldout_elbo", "double precision"),
               ("heldout_reconstruction", "double precision"),
               ("heldout_kl", "double precision"), ("heldout_log_px", "double precision"),
               ("heldout_importance_samples", "integer"), ("active_units", "integer"),
               ("kl_per_dim", "jsonb"), ("sweep_id", "text"),
               ("created_at", "timestamp with time zone"),
               ("updated_at", "timestamp with time zone"), ("aliases", "_text")],
    "training_metrics": [("model_id", "bigint"), ("epoch", "integer"), ("split", "text"),
                         ("elbo", "double precision"), ("reconstruction", "double precision"),
                         ("kl", "double precision"), ("log_px", "double precision"),
                         ("importance_samples", "integer"), ("loss", "double precision"),
                         ("beta", "double precision"), ("lr", "double precision"),
                         ("active_units", "integer"), ("seconds", "double precision")],
    "embedding_sets": [("set_id", "bigint"), ("model_id", "bigint"), ("dataset_id", "bigint"),
                       ("status", "text"), ("dim", "integer"), ("n_items", "bigint"),
                       ("importance_samples", "integer"), ("index_status", "text"),
                       ("index_metric", "text"), ("created_at", "timestamp with time zone"),
                       ("ready_at", "timestamp with time zone"), ("aliases", "_text")],
    "latents": [("set_id", "bigint"), ("model_id", "bigint"), ("dataset_id", "bigint"),
                ("key", "text"), ("item_index", "bigint"), ("label", "text"),
                ("metadata", "jsonb"), ("mu", "vector"), ("logvar", "vector"),
                ("elbo", "double precision"), ("reconstruction", "double precision"),
                ("kl", "double precision"), ("log_px", "double precision"),
                ("importance_samples", "integer")],
}


# columns appended since (migration 0007: Monte-Carlo errors, the likelihood's kind; 0013:
# how a set stores its vectors)
APPENDED = {
    "embedding_sets": [("vector_type", "text")],
    "models": [("likelihood_kind", "text"), ("heldout_log_px_se", "double precision"),
               ("heldout_bits_per_dim", "double precision")],
    "training_metrics": [("log_px_se", "double precision"), ("ess", "double precision")],
    "latents": [("log_px_se", "double precision"), ("ess", "double precision")],
}
CONTRACT = {name: columns + APPENDED.get(name, []) for name, columns in FIRST_RELEASE.items()}


@pytest.fixture(scope="module")
def surface(new_database):
    url = new_database("sql")
    migrate(url)
    db = Database(url)
    yield url, db
    db.dispose()


def view_columns(db):
    """Each view of the surface with its columns and their types, in order."""
    with db.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT table_name, column_name, "
            "CASE WHEN data_type = 'USER-DEFINED' THEN udt_name "
            "WHEN data_type = 'ARRAY' THEN udt_name ELSE data_type END "
            "FROM information_schema.columns WHERE table_schema = :s "
            "ORDER BY table_name, ordinal_position"), {"s": SCHEMA}).all()
    columns: dict[str, list[tuple[str, str]]] = {}
    for table, column, kind in rows:
        columns.setdefault(table, []).append((column, kind))
    return columns


def test_the_views_keep_their_columns(surface):
    url, db = surface
    assert view_columns(db) == CONTRACT
    # each release keeps every earlier column at its place: new ones only at the end
    command.downgrade(alembic_config(url), "0006")
    assert view_columns(db) == FIRST_RELEASE
    command.downgrade(alembic_config(url), "0004")
    assert view_columns(db) == {}
    migrate(url)
    assert view_columns(db) == CONTRACT


def test_the_reader_reads_the_views_and_nothing_else(surface):
    url, db = surface
    password = secrets.token_urlsafe(24)
    ensure_reader(db, password)
    ensure_reader(db, password)  # idempotent
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO datasets (name, item_shape, dtype, source_dtype, "
                          "source_format, n_items, checksum, artifact_key, size_bytes, "
                          "min_value, max_value, has_labels) VALUES ('d', '{4}', 'float32', "
                          "'float32', 'npy', 3, 'c', 'k', 48, 0, 1, false)"))
    dsn = reader_url(url.replace("postgresql+psycopg://", "postgresql://"), password)
    assert dsn.startswith("postgresql://latentbank_reader:")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT name, n_items FROM datasets").fetchall() == [("d", 3)]
        assert conn.execute("SELECT count(*) FROM lb_v1.latents").fetchone() == (0,)
        # pgvector's operators resolve on the role's search path
        assert conn.execute("SELECT '[1,2]'::vector <-> '[1,3]'::vector").fetchone() == (1.0,)
        for sql in ("SELECT * FROM public.latents", "SELECT * FROM public.api_keys",
                    "SELECT * FROM public.items"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TABLE lb_v1.mine (x int)")


def reader_dsn(url, password):
    return reader_url(url.replace("postgresql+psycopg://", "postgresql://"), password)


def test_the_reader_cannot_write_nor_make_temp_objects_even_with_read_only_off(surface):
    """default_transaction_read_only is only a default (any session may SET it off): the
    guard is that the role holds no privilege that writes or creates anything."""
    url, db = surface
    password = secrets.token_urlsafe(24)
    ensure_reader(db, password)
    with psycopg.connect(reader_dsn(url, password), autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = off")
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        assert conn.execute("SHOW transaction_read_only").fetchone() == ("off",)
        for sql in ("CREATE TEMP TABLE mine (x int)",
                    "CREATE TEMP VIEW mine AS SELECT 1",
                    "CREATE TABLE lb_v1.mine (x int)",
                    "CREATE TABLE public.mine (x int)",
                    "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                    "INSERT INTO public.api_keys (name) VALUES ('x')",
                    "DELETE FROM lb_v1.training_metrics",
                    "UPDATE lb_v1.datasets SET name = 'x'",
                    "COPY (SELECT 1) TO PROGRAM 'true'",
                    # large objects need no privilege by default: they fill the disk
                    "SELECT lo_from_bytea(0, repeat('x', 1000)::bytea)",
                    "SELECT lo_create(0)", "SELECT lo_creat(-1)",
                    # an advisory lock on the maintenance pass's key stops every pass
                    "SELECT pg_advisory_lock(1736263)",
                    "SELECT pg_try_advisory_lock(1, 2)",
                    "SELECT pg_advisory_lock_shared(hashtext('latentbank.embedded-roles'))",
                    "CREATE SCHEMA mine"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)


def test_the_reader_has_a_connection_limit_and_a_statement_timeout(surface):
    url, db = surface
    password = secrets.token_urlsafe(24)
    ensure_reader(db, password, connection_limit=2, statement_timeout_s=0.25)
    dsn = reader_dsn(url, password)
    with psycopg.connect(dsn, autocommit=True) as one, psycopg.connect(dsn) as two:
        with pytest.raises(psycopg.OperationalError, match="too many connections"):
            psycopg.connect(dsn)
        assert one.execute("SHOW statement_timeout").fetchone() == ("250ms",)
        with pytest.raises(psycopg.errors.QueryCanceled):
            one.execute("SELECT pg_sleep(5)")
        two.rollback()
    ensure_reader(db, password)  # the defaults again: limit 8, 120 s
    with db.engine.connect() as conn:
        limit, config = conn.execute(text(
            "SELECT rolconnlimit, rolconfig FROM pg_roles WHERE rolname = 'latentbank_reader'"
        )).one()
    assert limit == 8 and "statement_timeout=120000" in config


def test_the_password_reaches_the_server_only_as_a_scram_verifier(surface):
    from sqlalchemy import event

    url, db = surface
    password = secrets.token_urlsafe(24)
    sent = []

    def record(conn, cursor, statement, *rest):
        sent.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        ensure_reader(db, password)
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    assert sent and not [s for s in sent if password in s]
    assert any("PASSWORD 'SCRAM-SHA-256$4096:" in s for s in sent)
    with psycopg.connect(reader_dsn(url, password)) as conn:  # the server takes it
        assert conn.execute("SELECT current_user").fetchone() == ("latentbank_reader",)
    wrong = password[:-1] + ("A" if password[-1] != "A" else "B")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(reader_dsn(url, wrong))


def test_the_scram_verifier_matches_libpq(surface):
    """Against libpq's own PQencryptPasswordConn: same salt and iterations, same keys."""
    import base64

    from store.sql import scram_verifier

    url, _ = surface
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        for password in ("pencil", secrets.token_urlsafe(32), "a-b_c"):
            theirs = conn.pgconn.encrypt_password(password.encode(), b"anyone",
                                                  b"scram-sha-256").decode()
            iterations, salt = theirs.split("$")[1].split(":")
            assert scram_verifier(password, base64.b64decode(salt), int(iterations)) == theirs
            assert scram_verifier(password) != theirs  # a salt of its own each time
