"""One partition of `latents` per embedding set (LIST on `set_id`): made in the transaction
that makes the set, dropped after the set's row is deleted, so a set's rows, vacuum and
HNSW index are its own and deleting a set leaves no dead tuples behind
(docs/internals/data-layer.md, "Partitions")."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from store.db import Database

log = logging.getLogger(__name__)

PARTITION_PATTERN = re.compile(r"^latents_set_(\d+)$")
DROP_LOCK_TIMEOUT_MS = 5000
# what a partition must share with `latents` to be attached (its CHECKs above all)
LIKE_PARENT = ("INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE "
               "INCLUDING COMPRESSION")


def partition_name(set_id: int) -> str:
    return f"latents_set_{int(set_id)}"


def vectors_check(vector_type: str) -> str:
    """The CHECK a set's partition holds its rows to: the pair of vector columns of its
    `vector_type` filled, the other pair NULL (store/vectors.py)."""
    full, empty = ("mu", "logvar"), ("mu_half", "logvar_half")
    if vector_type == "halfvec":
        full, empty = empty, full
    return " AND ".join([f"{c} IS NOT NULL" for c in full] + [f"{c} IS NULL" for c in empty])


def create_partition(s: Session, set_id: int, vector_type: str = "vector") -> None:
    """The set's partition, inside the transaction that adds the set. Made apart and then
    attached: ATTACH takes only a SHARE UPDATE EXCLUSIVE lock on `latents`, so searches
    of other sets go on (CREATE TABLE ... PARTITION OF would wait for them and hold them
    up); the new table is empty, so the attach checks nothing. Its rows must fill the
    vector columns of the set's `vector_type` (a CHECK: a writer that names the other
    pair, an old worker during an upgrade say, is refused instead of storing NULLs)."""
    name = partition_name(set_id)
    s.execute(text(f"CREATE TABLE {name} (LIKE latents {LIKE_PARENT}, CONSTRAINT "
                   f"{name}_vectors CHECK ({vectors_check(vector_type)}))"))
    s.execute(text(f"ALTER TABLE latents ATTACH PARTITION {name} FOR VALUES IN ({int(set_id)})"))


def drop_partitions(db: Database, set_ids: Sequence[int],
                    wait_ms: int = DROP_LOCK_TIMEOUT_MS) -> list[int]:
    """Drop the partitions of deleted sets, after their rows are committed gone: each is
    detached CONCURRENTLY (searches and writes of other sets go on; it waits for the
    transactions that had `latents` open, a shard's COPY for one), then dropped.

    PostgreSQL lets one detach be pending at a time, and a detach whose wait is cut
    short stays pending until it is finished (FINALIZE): so drops run one at a time
    (an advisory lock; a caller that finds it taken leaves its sets), finish a pending
    detach first, and give up on a wait longer than `wait_ms`. Whatever is left (that,
    or any error: the set is gone already, so nothing is raised) the maintenance pass
    drops later (`orphan_partitions`). Returns the sets whose partition is left."""
    left = [int(i) for i in set_ids]
    if not left:
        return []
    try:
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if not conn.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"),
                                {"k": DROP_LOCK}).scalar():
                return left
            try:
                conn.execute(text(f"SET lock_timeout = {int(wait_ms)}"))
                _finish_pending(conn)
                while left:
                    _detach_and_drop(conn, left[0])
                    left.pop(0)
            finally:
                _release(conn)
    except DBAPIError as exc:
        log.warning("partition drop left for the maintenance pass set_ids=%s: %s", left,
                    str(exc.orig).strip().splitlines()[0] if exc.orig else exc)
    return left


DROP_LOCK = "latentbank.partition-drops"


def _finish_pending(conn: Connection) -> None:
    """Finish the detach a cut-short wait left pending (whatever its set), and drop it."""
    pending = conn.execute(text(
        "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = "
        "'latents'::regclass AND inhdetachpending")).scalars().all()
    for name in pending:
        conn.execute(text(f"ALTER TABLE latents DETACH PARTITION {name} FINALIZE"))
        conn.execute(text(f"DROP TABLE IF EXISTS {name}"))


def _detach_and_drop(conn: Connection, set_id: int) -> None:
    """Detach, then drop; each step's seconds logged. The DROP's time is mostly the file
    system's, freeing the partition's files (docs/benchmarks: about 0.2 s a GB on this
    project's test machine, with ext4's online discard)."""
    name = partition_name(set_id)
    started = time.perf_counter()
    attached = conn.execute(text(
        "SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(:n) "
        "AND inhparent = 'latents'::regclass"), {"n": name}).first()
    if attached is not None:
        conn.execute(text(f"ALTER TABLE latents DETACH PARTITION {name} CONCURRENTLY"))
    detached = time.perf_counter()
    conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
    log.info("partition dropped set_id=%d detach_s=%.3f drop_s=%.3f", set_id,
             detached - started, time.perf_counter() - detached)


def _release(conn: Connection) -> None:
    """The lock and the setting, before the connection goes back to the pool (one that
    cannot take that is not reused)."""
    try:
        conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": DROP_LOCK})
        conn.execute(text("RESET lock_timeout"))
    except DBAPIError:
        conn.invalidate()


def orphan_partitions(db: Database) -> list[int]:
    """Sets whose partition outlived them (a drop that waited too long, or a process that
    died between deleting the set and dropping its partition)."""
    with db.engine.connect() as conn:
        names = conn.execute(text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r' "
            "AND c.relname ~ '^latents_set_[0-9]+$' AND NOT EXISTS (SELECT 1 FROM "
            "embedding_sets e WHERE 'latents_set_' || e.id = c.relname)")).scalars().all()
    return sorted(int(m.group(1)) for n in names if (m := PARTITION_PATTERN.match(n)))


def partition_sizes(db: Database, set_id: int) -> dict[str, int]:
    """Bytes on disk of the set's partition: its rows (with TOAST), and its indexes."""
    with db.engine.connect() as conn:
        row = conn.execute(text(
            "SELECT pg_table_size(to_regclass(:n)), pg_indexes_size(to_regclass(:n))"),
            {"n": partition_name(set_id)}).first()
    return {"table_bytes": int(row[0] or 0), "index_bytes": int(row[1] or 0)}
