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
        return {**asdict(self), "predicted_fits": self.fits}


LOOPBACK = ("localhost", "127.0.0.1", "::1")


def server_is_local(db: Database) -> bool:
    """The database server runs on this host: a loopback address, or a Unix socket (the
    embedded server; a URL without a host means libpq's default, PGHOST or a socket), so
    this host's cores and memory are the server's."""
    url = db.engine.url
    if url.host:
        return url.host in LOOPBACK
    host = url.query.get("host") or os.environ.get("PGHOST") or "/"
    host = host[0] if isinstance(host, tuple) else host
    return host.startswith("/") or host in LOOPBACK


def _cgroup(name: str) -> str | None:
    try:
        with open(f"/sys/fs/cgroup/{name}") as f:
            return f.read().strip()
    except OSError:
        return None


def local_cores() -> int:
    """The cores this process may use: its affinity (a taskset), within the cgroup's CPU
    quota (a container's --cpus)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = (_cgroup("cpu.max") or "max").split()
    if quota[0] != "max" and len(quota) == 2 and int(quota[1]) > 0:
        cores = min(cores, max(1, int(quota[0]) // int(quota[1])))
    return cores


def local_memory_mb() -> int:
    """This host's memory, within the cgroup's limit (a container's --memory)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup("memory.max")
    if limit and limit.isdigit():
        total = min(total, int(limit))
    return total // MiB


def server_setting(conn: Connection, name: str) -> int:
    """The server's own value of a setting (not this session's: a pooled connection may
    carry a SET)."""
    return int(conn.execute(text("SELECT reset_val FROM pg_settings WHERE name = :n"),
                            {"n": name}).scalar_one())


def plan_build(conn: Connection, settings: Settings, local: bool, n_items: int, dim: int,
               m: int, value_bytes: int = 4) -> BuildPlan:
    """Memory: the graph's size with a tenth to spare, at least PostgreSQL's default, at
    most `index_build_max_memory_mb` (unset: a quarter of the server's memory when it is
    local, else 1 GiB). Workers: `index_build_workers` (unset: half the server's cores
    when it is local, leaving the rest to searches and loads, else the server's own
    max_parallel_maintenance_workers), never more than the server's max_parallel_workers,
    nor more than PostgreSQL would start with that memory (32 MB a process), and none when
    a local server's /dev/shm could not hold the graph (a parallel build keeps it there).
    PostgreSQL may still start fewer (a small table, no free worker slot): the build
    records how many it started."""
    needed = math.ceil(graph_bytes(n_items, dim, m, value_bytes) / MiB)
    cap = settings.index_build_max_memory_mb or (
        max(MIN_BUILD_MEMORY_MB, local_memory_mb() // 4) if local else REMOTE_BUILD_MEMORY_MB)
    memory = max(MIN_BUILD_MEMORY_MB, min(cap, math.ceil(needed * 1.1)))
    if settings.index_build_workers is not None:
        workers = settings.index_build_workers
    elif local:
        workers = local_cores() // 2
    else:
        workers = server_setting(conn, "max_parallel_maintenance_workers")
    workers = max(0, min(workers, server_setting(conn, "max_parallel_workers"),
                         memory // 32 - 1))
    shm = shared_memory_mb() if local and workers > 0 else None
    if shm is not None and memory > 0.9 * shm:  # a parallel graph lives in /dev/shm
        workers = 0
    return BuildPlan(workers, memory, needed)


def is_out_of_resources(exc: BaseException) -> bool:
    """The server ran out of memory or disk for the build (SQLSTATE class 53), as a
    parallel build does when its graph's shared memory cannot be had (a small /dev/shm in
    a container: "could not resize shared memory segment"): not the database going away,
    so the build is not sent again as is."""
    orig = getattr(exc, "orig", exc)
    return (str(getattr(orig, "sqlstate", "") or "").startswith("53")
            or "could not resize shared memory segment" in str(orig))


def shared_memory_mb() -> int | None:
    """Free space of this host's /dev/shm, where a parallel build's graph lives; None
    where there is none to see."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize // MiB


BUILD_SETTINGS = ("maintenance_work_mem", "max_parallel_maintenance_workers",
                  "client_min_messages")


def apply_plan(conn: Connection, plan: BuildPlan) -> None:
    """The plan as this session's settings (`reset_plan` undoes them); notices on, so
    pgvector's word that the graph outgrew its memory reaches IndexWatch."""
    conn.execute(text(f"SET maintenance_work_mem = '{int(plan.memory_mb)}MB'"))
    conn.execute(text(f"SET max_parallel_maintenance_workers = {int(plan.workers)}"))
    conn.execute(text("SET client_min_messages = notice"))


def reset_plan(conn: Connection) -> None:
    """The session's settings back to the server's, before the connection goes back to
    the pool; a connection that cannot take that is not reused."""
    try:
        for name in BUILD_SETTINGS:
            conn.execute(text(f"RESET {name}"))
    except Exception:
        conn.invalidate()


def write_build(db: Database, set_id: int, owner: str | None,
                build: dict[str, Any]) -> bool:
    """The set's `index_build`, while this build (`owner`; None: a direct build) still
    holds it; whether it did."""
    query = update(EmbeddingSet).where(EmbeddingSet.id == set_id,
                                       EmbeddingSet.index_status == "building",
                                       EmbeddingSet.index_owner.is_not_distinct_from(owner))
    with db.session() as s:
        return s.execute(query.values(index_build=build)
                         .returning(EmbeddingSet.id)).first() is not None


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
        self.launched = 0  # parallel workers PostgreSQL started (seen while it ran)
        self.started = time.perf_counter()
        self._raw = conn.connection.driver_connection
        self._pid = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"index-watch-{set_id}",
                                        daemon=True)

    def __enter__(self) -> IndexWatch:
        self.write({"phase": "starting", "tuples_done": 0, "fraction": 0.0})
        self._thread.start()
        self._raw.add_notice_handler(self._notice)  # last: nothing after it can fail
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stop.set()
            self._thread.join()
        finally:
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
        return {**self.plan.as_dict(), "workers_launched": self.launched,
                "spilled_after": self.spilled_after, "fits": self.spilled_after is None,
                "seconds": round(time.perf_counter() - self.started, 1), **extra}

    def write(self, progress: dict[str, Any]) -> bool:
        return write_build(self.db, self.set_id, self.owner, self.state(**progress))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.db.engine.connect() as conn:
                    row = conn.execute(text(
                        "SELECT phase, tuples_done, (SELECT count(*) FROM pg_stat_activity "
                        "WHERE leader_pid = :pid) AS launched "
                        "FROM pg_stat_progress_create_index WHERE pid = :pid"),
                        {"pid": self._pid}).first()
                if row is not None and not self._stop.is_set():
                    self.launched = max(self.launched, int(row.launched))
                    done = int(row.tuples_done or 0)
                    self.write({"phase": row.phase, "tuples_done": done,
                                "fraction": self.fraction(row.phase, done)})
            except Exception:  # a database blip: the next poll tries again
                log.warning("index progress poll failed set_id=%d", self.set_id,
                            exc_info=True)
