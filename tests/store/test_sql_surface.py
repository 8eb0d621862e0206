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
from store.sql import ensure_reader, reader_url, view_columns

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


# columns appended since (migration 0007: Monte-Carlo errors, the likelihood's kind)
APPENDED = {
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
