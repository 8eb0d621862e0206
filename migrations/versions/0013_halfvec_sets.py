"""Halved vectors per set: `embedding_sets.vector_type` ('vector', the default, or
'halfvec'), and two halfvec columns of `latents`, `mu_half` and `logvar_half`, that a
halfvec set fills instead of `mu` and `logvar` (a partition cannot change a column's type,
so each set uses one pair of columns; the other is NULL, which costs a bit of the null
bitmap). `mu` and `logvar` become nullable for that; the data layer writes exactly one
pair, and each set's partition holds its rows to its pair with a CHECK (new partitions
from store/partitions.py; the existing ones, all `vector`, get theirs NOT VALID: nothing
is scanned, new rows are checked). The SQL view `lb_v1.latents` answers float32 `mu` and
`logvar` either way; `lb_v1.embedding_sets` gains `vector_type` as its last column.

Adding the columns and dropping NOT NULL change only the catalog (no rewrite). halfvec
needs pgvector >= 0.7: on an older one the migration stops and says how to update it.
The downgrade turns halfvec sets back into vector sets (their rows' values widened to
float32, their index owed again on `mu`): it rewrites every halfvec row and scans every
partition for SET NOT NULL under an exclusive lock, so stop the API and the workers
first on a large database.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy import text

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

LATENTS_VIEW = """
    CREATE OR REPLACE VIEW lb_v1.latents AS
    SELECT l.set_id, e.model_id, l.dataset_id, i.key, l.item_index, i.label,
           i.metadata, {mu} AS mu, {logvar} AS logvar, l.elbo, l.reconstruction, l.kl,
           l.log_px, e.importance_samples, l.log_px_se, l.ess
    FROM public.latents l
    JOIN public.embedding_sets e ON e.id = l.set_id AND e.status = 'ready'
    JOIN public.items i ON i.dataset_id = l.dataset_id AND i.index = l.dataset_index"""
SETS_VIEW = """
    CREATE OR REPLACE VIEW lb_v1.embedding_sets AS
    SELECT e.id AS set_id, e.model_id, e.dataset_id, e.status, e.dim, e.n_items,
           e.importance_samples, e.index_status, e.index_metric, e.created_at,
           e.ready_at,
           ARRAY(SELECT a.name FROM public.aliases a WHERE a.embedding_set_id = e.id
                 ORDER BY a.name) AS aliases{extra}
    FROM public.embedding_sets e"""
VECTOR_ROWS = "mu IS NOT NULL AND logvar IS NOT NULL AND mu_half IS NULL AND logvar_half IS NULL"
OWED = ("UPDATE embedding_sets SET index_status = 'building', index_requested_at = now(), "
        "index_sent_at = NULL, index_owner = NULL, index_lease_expires_at = NULL, "
        "index_attempts = 0, index_error = NULL, hnsw_ef_search = NULL, index_build = NULL "
        "WHERE vector_type = 'halfvec' AND status = 'ready' "
        "AND index_status IN ('ready', 'building')")


def upgrade() -> None:
    conn = op.get_bind()
    if conn.execute(text("SELECT to_regtype('halfvec') IS NULL")).scalar():
        version = conn.execute(text(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
        raise RuntimeError(
            f"this database's pgvector is {version}; latentbank needs >= 0.7 (its halfvec "
            f"type). Install a newer pgvector on the server, then, as a superuser, run "
            f"`ALTER EXTENSION vector UPDATE;` in this database and migrate again")
    op.add_column('embedding_sets', sa.Column('vector_type', sa.Text(), nullable=False,
                                              server_default='vector'))
    op.create_check_constraint(op.f('ck_embedding_sets_vector_type_valid'), 'embedding_sets',
                               "vector_type IN ('vector', 'halfvec')")
    op.execute("ALTER TABLE latents ADD COLUMN mu_half halfvec, "
               "ADD COLUMN logvar_half halfvec, ALTER COLUMN mu DROP NOT NULL, "
               "ALTER COLUMN logvar DROP NOT NULL")
    op.execute(LATENTS_VIEW.format(mu="coalesce(l.mu, l.mu_half::vector)",
                                   logvar="coalesce(l.logvar, l.logvar_half::vector)"))
    op.execute(SETS_VIEW.format(extra=", e.vector_type"))
    for name in _partitions(conn):  # every set is a vector set so far
        op.execute(f"ALTER TABLE {name} ADD CONSTRAINT {name}_vectors "
                   f"CHECK ({VECTOR_ROWS}) NOT VALID")


def _partitions(conn: sa.Connection) -> list[str]:
    return list(conn.execute(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'public.latents'::regclass ORDER BY 1")).scalars())


def downgrade() -> None:
    for name in _partitions(op.get_bind()):
        op.execute(f"ALTER TABLE {name} DROP CONSTRAINT IF EXISTS {name}_vectors")
    op.execute("DROP VIEW lb_v1.embedding_sets")  # a view cannot lose a column in place
    op.execute(SETS_VIEW.format(extra="").replace("CREATE OR REPLACE", "CREATE"))
    op.execute(OWED)  # their index is on mu_half, which goes
    op.execute("UPDATE latents SET mu = mu_half::vector, logvar = logvar_half::vector, "
               "mu_half = NULL, logvar_half = NULL WHERE mu IS NULL")
    op.execute(LATENTS_VIEW.format(mu="l.mu", logvar="l.logvar"))
    op.execute("ALTER TABLE latents DROP COLUMN mu_half, DROP COLUMN logvar_half, "
               "ALTER COLUMN mu SET NOT NULL, ALTER COLUMN logvar SET NOT NULL")
    op.drop_constraint(op.f('ck_embedding_sets_vector_type_valid'), 'embedding_sets',
                       type_='check')
    op.drop_column('embedding_sets', 'vector_type')
