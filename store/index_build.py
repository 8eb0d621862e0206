"""What an HNSW build is given and how it goes: memory sized from the set so its graph fits,
parallel workers from the server's cores, and its progress polled from
`pg_stat_progress_create_index` into the set's `index_build` while it runs
(docs/internals/data-layer.md, "Index builds")."""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, text, update

from store.db import Database
from store.settings import Settings
from store.tables import EmbeddingSet

log = logging.getLogger(__name__)

MiB = 1 << 20
# pgvector's in-memory graph, per element: its vector, a layer-0 neighbour list of 2m
# candidates (16 bytes each: a pointer and a distance, padded) and a fixed part (the
# element's header, its upper layers on average, allocation slack). Fitted to pgvector
# 0.8's own accounting (the tuple count of its "no longer fits" notice) over dim 8-128,
# m 8-32, vector and halfvec, within 1 %; tests/store/test_index_build.py keeps it honest.
GRAPH_FIXED_BYTES = 200
GRAPH_BYTES_PER_NEIGHBOUR = 16
MIN_BUILD_MEMORY_MB = 64  # PostgreSQL's own default maintenance_work_mem
REMOTE_BUILD_MEMORY_MB = 1024  # the cap when the server's memory cannot be seen from here
SPILL_NOTICE = re.compile(r"hnsw graph no longer fits into maintenance_work_mem after "
                          r"(\d+) tuples")


def graph_bytes(n_items: int, dim: int, m: int, value_bytes: int = 4) -> int:
    """The memory pgvector needs to hold the HNSW graph of `n_items` vectors of `dim`
    values (`value_bytes` each: 4 for vector, 2 for halfvec) at `m` links per layer."""
    return n_items * (GRAPH_FIXED_BYTES + value_bytes * dim + 2 * m * GRAPH_BYTES_PER_NEIGHBOUR)


@dataclass(frozen=True)
class BuildPlan:
    """What one build is given: `workers` parallel workers besides the leader,
    `memory_mb` of maintenance_work_mem, against the `needed_mb` its graph takes."""

    workers: int
    memory_mb: int
    needed_mb: int

    @property
    def fits(self) -> bool:
        return self.needed_mb <= self.memory_mb

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}


def server_is_local(db: Database) -> bool:
    """The database server runs on this host: a Unix socket (the embedded server) or a
    loopback address, so this host's cores and memory are the server's."""
    url = db.engine.url
    return url.host in (None, "", "localhost", "127.0.0.1", "::1")


def local_cores() -> int:
    """The cores this process may run on (a container's or a taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def local_memory_mb() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MiB


def _show(conn: Connection, name: str) -> int:
    return int(conn.execute(text(f"SHOW {name}")).scalar_one())


def plan_build(conn: Connection, settings: Settings, local: bool, n_items: int, dim: int,
               m: int, value_bytes: int = 4) -> BuildPlan:
    """Memory: the graph's size with a tenth to spare, at least PostgreSQL's default, at
    most `index_build_max_memory_mb` (unset: a quarter of the server's memory when it is
    local, else 1 GiB). Workers: `index_build_workers` (unset: the server's cores less the
    leader when it is local, else the server's own max_parallel_maintenance_workers),
    never more than the server's max_parallel_workers allows, and none when a local
    server's /dev/shm could not hold the graph (a parallel build keeps it there)."""
    needed = math.ceil(graph_bytes(n_items, dim, m, value_bytes) / MiB)
    cap = settings.index_build_max_memory_mb or (
        max(MIN_BUILD_MEMORY_MB, local_memory_mb() // 4) if local else REMOTE_BUILD_MEMORY_MB)
    memory = max(MIN_BUILD_MEMORY_MB, min(cap, math.ceil(needed * 1.1)))
    if settings.index_build_workers is not None:
        workers = settings.index_build_workers
    elif local:
        workers = local_cores() - 1
    else:
        workers = _show(conn, "max_parallel_maintenance_workers")
    workers = max(0, min(workers, _show(conn, "max_parallel_workers")))
    shm = shared_memory_mb() if local and workers > 0 else None
    if shm is not None and memory > 0.9 * shm:  # a parallel graph lives in /dev/shm
        workers = 0
    return BuildPlan(workers, memory, needed)


def is_shared_memory_full(exc: BaseException) -> bool:
    """A parallel build could not get its graph's shared memory (a small /dev/shm, as in
    a container): the same build with one process needs none."""
    return "could not resize shared memory segment" in str(getattr(exc, "orig", exc))


def shared_memory_mb() -> int | None:
    """Free space of this host's /dev/shm, where a parallel build's graph lives; None
    where there is none to see."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize // MiB


def apply_plan(conn: Connection, plan: BuildPlan) -> None:
    conn.execute(text(f"SET maintenance_work_mem = '{int(plan.memory_mb)}MB'"))
    conn.execute(text(f"SET max_parallel_maintenance_workers = {int(plan.workers)}"))


class IndexWatch:
    """While a build runs on `conn`: pgvector's notices caught (the one that says the graph
    outgrew its memory, with the tuple count), and from a thread every `interval` seconds
    the build's row of pg_stat_progress_create_index written into the set's `index_build`
    (the plan, the phase, tuples loaded and their share of the set), only while the set's
    index is still `building` under `owner` (None: under no owner)."""

    def __init__(self, db: Database, conn: Connection, set_id: int, n_items: int,
                 plan: BuildPlan, owner: str | None, interval: float = 1.0) -> None:
        self.db, self.set_id, self.n_items, self.plan, self.owner = db, set_id, n_items, plan, owner
        self.interval = interval
        self.spilled_after: int | None = None
        self.started = time.perf_counter()
        self._raw = conn.connection.driver_connection
        self._pid = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"index-watch-{set_id}",
                                        daemon=True)

    def __enter__(self) -> IndexWatch:
        self._raw.add_notice_handler(self._notice)
        self.write({"phase": "starting", "tuples_done": 0, "fraction": 0.0})
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._raw.remove_notice_handler(self._notice)

    def _notice(self, diag: Any) -> None:
        found = SPILL_NOTICE.search(diag.message_primary or "")
        if found and self.spilled_after is None:
            self.spilled_after = int(found.group(1))
            log.warning("index graph outgrew its memory set_id=%d after_tuples=%d "
                        "memory_mb=%d needed_mb=%d: the rest is built on disk (slower); "
                        "raise LATENTBANK_INDEX_BUILD_MAX_MEMORY_MB", self.set_id,
                        self.spilled_after, self.plan.memory_mb, self.plan.needed_mb)

    def fraction(self, phase: str, tuples_done: int) -> float:
        """The build's share done: tuples loaded over the set's items while the graph is
        built (the view's tuples_total is 0 for pgvector, and its blocks count the whole
        shared table); 0 before, 1 in the validation that follows (CONCURRENTLY)."""
        if phase.startswith("building index"):
            return round(min(1.0, tuples_done / max(1, self.n_items)), 4)
        return 0.0 if phase in ("initializing", "waiting for writers before build") else 1.0

    def state(self, **extra: Any) -> dict[str, Any]:
        return {**self.plan.as_dict(), "spilled_after": self.spilled_after,
                "fits": self.plan.fits and self.spilled_after is None,
                "seconds": round(time.perf_counter() - self.started, 1), **extra}

    def write(self, progress: dict[str, Any]) -> bool:
        query = update(EmbeddingSet).where(EmbeddingSet.id == self.set_id,
                                           EmbeddingSet.index_status == "building",
                                           EmbeddingSet.index_owner.is_not_distinct_from(
                                               self.owner))
        with self.db.session() as s:
            return s.execute(query.values(index_build=self.state(**progress))
                             .returning(EmbeddingSet.id)).first() is not None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.db.engine.connect() as conn:
                    row = conn.execute(text(
                        "SELECT phase, tuples_done FROM pg_stat_progress_create_index "
                        "WHERE pid = :pid"), {"pid": self._pid}).first()
                if row is not None and not self._stop.is_set():
                    done = int(row.tuples_done or 0)
                    self.write({"phase": row.phase, "tuples_done": done,
                                "fraction": self.fraction(row.phase, done)})
            except Exception:  # a database blip: the next poll tries again
                log.warning("index progress poll failed set_id=%d", self.set_id,
                            exc_info=True)
