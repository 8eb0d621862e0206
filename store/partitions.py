"""One partition of `latents` per embedding set (LIST on `set_id`): made in the transaction
that makes the set, dropped after the set's row is deleted, so a set's rows, vacuum and
HNSW index are its own and deleting a set leaves no dead tuples behind
(docs/internals/data-layer.md, "Partitions")."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from store.db import Database

log = logging.getLogger(__name__)

PARTITION_PATTERN = re.compile(r"^latents_set_(\d+)$")
DROP_LOCK_TIMEOUT_MS = 5000


def partition_name(set_id: int) -> str:
    return f"latents_set_{int(set_id)}"


def create_partition(s: Session, set_id: int) -> None:
    """The set's partition, inside the transaction that adds the set. Made apart and then
    attached: ATTACH takes only a SHARE UPDATE EXCLUSIVE lock on `latents`, so searches
    of other sets go on (CREATE TABLE ... PARTITION OF would wait for them and hold them
    up); the new table is empty, so the attach checks nothing."""
    name = partition_name(set_id)
    s.execute(text(f"CREATE TABLE {name} (LIKE latents INCLUDING DEFAULTS)"))
    s.execute(text(f"ALTER TABLE latents ATTACH PARTITION {name} FOR VALUES IN ({int(set_id)})"))


def drop_partitions(db: Database, set_ids: Sequence[int],
                    lock_timeout_ms: int = DROP_LOCK_TIMEOUT_MS) -> list[int]:
    """Drop the partitions of deleted sets: detached CONCURRENTLY (searches of other sets
    are not held up; it waits for transactions that still read `latents`), then dropped.
    A partition whose detach or drop waits longer than `lock_timeout_ms` is left for the
    maintenance pass (`orphan_partitions`); one left half-detached is finished. Returns
    the sets whose partition is left."""
    left = []
    for set_id in set_ids:
        name = partition_name(set_id)
        try:
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f"SET lock_timeout = {int(lock_timeout_ms)}"))
                try:
                    attached = conn.execute(text(
                        "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = "
                        "to_regclass(:n) AND inhparent = 'latents'::regclass"),
                        {"n": name}).first()
                    if attached is not None:
                        how = "FINALIZE" if attached[0] else "CONCURRENTLY"
                        conn.execute(text(f"ALTER TABLE latents DETACH PARTITION {name} {how}"))
                    conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
                finally:  # the connection goes back to the pool
                    conn.execute(text("RESET lock_timeout"))
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
                raise
            log.warning("partition drop waited too long set_id=%d: left for the maintenance "
                        "pass", set_id)
            left.append(int(set_id))
    return left


def orphan_partitions(db: Database) -> list[int]:
    """Sets whose partition outlived them (a drop that waited too long, or a process that
    died between deleting the set and dropping its partition)."""
    with db.engine.connect() as conn:
        names = conn.execute(text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r' "
            "AND c.relname LIKE 'latents\\_set\\_%' AND NOT EXISTS (SELECT 1 FROM "
            "embedding_sets e WHERE 'latents_set_' || e.id = c.relname)")).scalars().all()
    return sorted(int(m.group(1)) for n in names if (m := PARTITION_PATTERN.match(n)))


def partition_sizes(db: Database, set_id: int) -> dict[str, int]:
    """Bytes on disk of the set's partition: its rows (with TOAST), and its indexes."""
    with db.engine.connect() as conn:
        row = conn.execute(text(
            "SELECT pg_table_size(to_regclass(:n)), pg_indexes_size(to_regclass(:n))"),
            {"n": partition_name(set_id)}).first()
    return {"table_bytes": int(row[0] or 0), "index_bytes": int(row[1] or 0)}
