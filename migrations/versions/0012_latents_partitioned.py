"""`latents` becomes a partitioned table, LIST on `set_id`, one partition per embedding set
(`latents_set_<id>`, store/partitions.py): a set's rows, vacuum and HNSW index are its
own, and deleting a set drops its partition (no DELETE, no dead tuples). The foreign key
to `embedding_sets` goes: the data layer makes a set's partition with the set and drops
it after the set (a partition left behind is dropped by the maintenance pass), and a
row cannot be written for a set without a partition.

Every set's rows move into its partition (one INSERT ... SELECT: plan for its time and
twice the table's disk on a large database). Stop the API and the workers first: the
migration locks `embedding_sets` against new sets, and workers of the old release would
build indexes on the parent. It takes about eight locks a set in one transaction: past
about 2,000 sets raise `max_locks_per_transaction` for it. The views that read `latents` (lb_v1) are
redefined as they were, so their columns, meaning and grants do not change. The old
per-set partial HNSW indexes go with the old table: sets whose index was ready or being
built are owed a new one (on their partition), which the maintenance pass sends; their
searches are exact until it is built. The downgrade moves the rows back the same way.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 10:30:00
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

PK = 'pk_latents'
FK = 'fk_latents_set_id_embedding_sets'
OWED = ("UPDATE embedding_sets SET index_status = 'building', index_requested_at = now(), "
        "index_sent_at = NULL, index_owner = NULL, index_lease_expires_at = NULL, "
        "index_attempts = 0, index_error = NULL, hnsw_ef_search = NULL, index_build = NULL "
        "WHERE status = 'ready' AND index_status IN ('ready', 'building')")


def _dependent_views() -> list[tuple[str, str]]:
    """(name, definition) of the views that read public.latents, outermost last."""
    rows = op.get_bind().execute(text(
        "SELECT DISTINCT v.oid::regclass::text, pg_get_viewdef(v.oid), v.oid "
        "FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid "
        "JOIN pg_class v ON v.oid = r.ev_class "
        "WHERE d.classid = 'pg_rewrite'::regclass "
        "AND d.refobjid = 'public.latents'::regclass AND v.oid <> d.refobjid "
        "ORDER BY v.oid")).all()
    return [(name, definition) for name, definition, _ in rows]


def _swap(old_name: str, create: list[str], after: tuple[str, ...] = ()) -> None:
    """Rename `latents` to `old_name`, make the new `latents` (`create`), move the rows of
    the sets that exist, run `after`, point the views at it, drop the old table (with its
    partitions, if any)."""
    views = _dependent_views()
    op.execute(f"ALTER TABLE latents RENAME TO {old_name}")
    op.execute(f"ALTER TABLE {old_name} RENAME CONSTRAINT {PK} TO {PK}_old")
    for statement in create:
        op.execute(statement)
    op.execute(f"INSERT INTO latents SELECT * FROM {old_name} "
               "WHERE set_id IN (SELECT id FROM embedding_sets)")
    for statement in after:
        op.execute(statement)
    for name, definition in views:
        op.execute(f"CREATE OR REPLACE VIEW {name} AS {definition}")
    op.execute(f"DROP TABLE {old_name}")  # a partitioned one takes its partitions
    op.execute(OWED)


LIKE = "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION"


def upgrade() -> None:
    bind = op.get_bind()
    # no set is added (by a service still running) between this read and the commit
    op.execute("LOCK TABLE embedding_sets IN SHARE ROW EXCLUSIVE MODE")
    set_ids = bind.execute(text("SELECT id FROM embedding_sets ORDER BY id")).scalars().all()
    create = [f"CREATE TABLE latents (LIKE latents_unpartitioned {LIKE}) "
              "PARTITION BY LIST (set_id)",
              f"ALTER TABLE latents ADD CONSTRAINT {PK} PRIMARY KEY (set_id, item_index)"]
    for set_id in set_ids:
        name = f"latents_set_{int(set_id)}"
        create += [f"CREATE TABLE {name} (LIKE latents {LIKE})",
                   f"ALTER TABLE latents ATTACH PARTITION {name} FOR VALUES IN ({int(set_id)})"]
    _swap("latents_unpartitioned", create)


def downgrade() -> None:
    _swap("latents_partitioned", [
        f"CREATE TABLE latents (LIKE latents_partitioned {LIKE})",
        f"ALTER TABLE latents ADD CONSTRAINT {PK} PRIMARY KEY (set_id, item_index)"],
        after=(f"ALTER TABLE latents ADD CONSTRAINT {FK} FOREIGN KEY (set_id) "
               "REFERENCES embedding_sets (id) ON DELETE CASCADE",))
