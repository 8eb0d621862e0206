"""A set's HNSW index: built CONCURRENTLY after the bulk load, calibrated to the recall
target, and owed, claimed under a lease and repaired as a task of its own."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sqlalchemy import Text, cast, func, literal, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from store.db import Database, analyze, binary_rows, is_transient
from store.embedding_sets import get_set
from store.index_build import (
    BuildPlan,
    IndexWatch,
    MiB,
    apply_plan,
    is_out_of_resources,
    plan_build,
    reset_plan,
    server_is_local,
    write_build,
)
from store.jobs import OwnerCheck
from store.partitions import partition_name
from store.search import nearest
from store.settings import Settings
from store.tables import EmbeddingSet
from store.vectors import indexed_sql, mu_sql, opclass

log = logging.getLogger(__name__)

EF_CANDIDATES = (40, 80, 160, 320, 640, 1000)


def index_name(set_id: int) -> str:
    return f"latents_mu_hnsw_{int(set_id)}"


@dataclass
class IndexReport:
    status: str
    build_seconds: float = 0.0
    ef_search: int | None = None
    recall: dict[int, float] = field(default_factory=dict)
    hnsw_ms: dict[int, float] = field(default_factory=dict)
    exact_ms: float | None = None
    written: bool = True  # False: a build that lost its lease wrote no outcome
    build: dict[str, Any] | None = None  # what the set's `index_build` says at the end


def build_index(db: Database, set_id: int, settings: Settings, m: int = 16,
                ef_construction: int = 64, calibration_queries: int = 40,
                owner: str | None = None, plan: BuildPlan | None = None,
                progress_interval: float = 1.0) -> IndexReport:
    """Build the set's HNSW index (CONCURRENTLY: reads and writes go on), then calibrate.

    Calibration runs `calibration_queries` of the set's own vectors through exact and
    HNSW search at increasing ef_search, and keeps the smallest ef_search whose mean
    recall@10 reaches the target with a margin, if that is faster than exact search.

    With `owner` (the holder of the build's lease, `claim_index`) the set is `building`
    already and the outcome is written only while `owner` holds the build. A failure of
    the build or of the calibration marks the index `failed` with its reason (searches
    stay exact, the set can be deleted), unless it is the database going away: then the
    caller retries, or the maintenance pass sends the build again.

    The build gets the memory and parallel workers of `plan` (default: `plan_build`, sized
    from the set and the server); its progress goes into the set's `index_build` every
    `progress_interval` seconds, and what it was given and whether its graph fitted in
    memory stay there when it ends.
    """
    es = get_set(db, set_id)
    if es.n_items < settings.exact_search_below:
        analyze(db, partition_name(set_id))
        return IndexReport("skipped", written=_set_index(db, set_id, "skipped", None, owner))
    if owner is None:  # a direct build (tests, benches): no worker's lease holds the set
        with db.session() as s:
            s.execute(update(EmbeddingSet).where(EmbeddingSet.id == set_id).values(
                index_status="building", hnsw_ef_search=None, index_build=None,
                index_owner=None, index_lease_expires_at=None))
    name, started = index_name(set_id), time.perf_counter()
    watches: list[IndexWatch] = []
    try:
        vacuum_seconds = _vacuum(db, set_id, owner)
        index_mb = _create(db, es, settings, m, ef_construction, plan, owner,
                           progress_interval, watches)
        watch = watches[-1]
        watch.write({"phase": "calibrating", "fraction": 1.0, "index_mb": index_mb})
        report = IndexReport("ready", build_seconds=time.perf_counter() - started,
                             build=watch.state(phase="done", fraction=1.0, index_mb=index_mb,
                                               vacuum_seconds=vacuum_seconds))
        _calibrate(db, es, settings, calibration_queries, report)
    except Exception as exc:
        if not is_transient(exc) or is_out_of_resources(exc):
            build = watches[-1].state(phase="failed") if watches else None
            if _set_index(db, set_id, "failed", None, owner,
                          error=f"{type(exc).__name__}: {exc}", build=build):
                _drop_invalid(db, name)  # ours to drop: no other build holds the set
        raise
    report.written = _set_index(db, set_id, "ready", report.ef_search, owner,
                                build=report.build)
    log.info("index built set_id=%d seconds=%.1f ef_search=%s recall=%s workers=%d "
             "launched=%d memory_mb=%d needed_mb=%d fits=%s", set_id, report.build_seconds,
             report.ef_search, report.recall, watch.plan.workers, watch.launched,
             watch.plan.memory_mb, watch.plan.needed_mb, report.build["fits"])
    return report


def _vacuum(db: Database, set_id: int, owner: str | None) -> float:
    """VACUUM (ANALYZE) the set's partition before its build, its phase on the set while it
    runs; returns the seconds it took.

    A new set's rows were just inserted, and autovacuum's insert threshold would send it
    through the whole partition later, at a time of its choosing, reading and rewriting
    every page (hint bits, the visibility map): at 10M rows that came right after the
    build, among the first searches (docs/operations/scaling-out.md). Done here it is one
    pass before the build, whose own heap scan then reads clean pages."""
    write_build(db, set_id, owner, {"phase": "vacuuming the new rows", "fraction": 0.0})
    started = time.perf_counter()
    analyze(db, partition_name(set_id), vacuum=True)
    return round(time.perf_counter() - started, 1)


def _create(db: Database, es: EmbeddingSet, settings: Settings, m: int, ef_construction: int,
            plan: BuildPlan | None, owner: str | None, progress_interval: float,
            watches: list[IndexWatch]) -> float:
    """CREATE INDEX CONCURRENTLY on the set's partition under `plan` (default: plan_build),
    once more with one process when the server refuses a parallel build its memory; each
    attempt's IndexWatch goes into `watches`. Returns the index's MiB on disk."""
    name = index_name(es.id)
    create = (f"CREATE INDEX CONCURRENTLY {name} ON {partition_name(es.id)} USING hnsw "
              f"(({indexed_sql(es, '')}) {opclass(es, es.index_metric)}) "
              f"WITH (m = {int(m)}, ef_construction = {int(ef_construction)})")
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        try:
            plan = plan or plan_build(conn, settings, server_is_local(db), es.n_items,
                                      es.dim, m, 2 if es.vector_type == "halfvec" else 4)
            for attempt in (plan, replace(plan, workers=0)):
                apply_plan(conn, attempt)
                conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                watches.append(IndexWatch(db, conn, es.id, es.n_items, attempt, owner,
                                          progress_interval))
                try:
                    with watches[-1]:
                        conn.execute(text(create))
                    break
                except OperationalError as exc:
                    if attempt.workers == 0 or not is_out_of_resources(exc):
                        raise
                    log.warning("parallel index build ran out of memory set_id=%d "
                                "memory_mb=%d (%s): building with one process (give the "
                                "database server a larger /dev/shm, e.g. compose's "
                                "shm_size)", es.id, attempt.memory_mb, exc.orig)
            return round(conn.execute(text(
                f"SELECT pg_relation_size('{name}')")).scalar_one() / MiB, 1)
        finally:
            reset_plan(conn)  # the connection goes back to the pool


def _drop_invalid(db: Database, name: str) -> None:
    """Best effort: a failed CREATE INDEX CONCURRENTLY leaves an invalid index that
    inserts would go on maintaining."""
    try:
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))
    except Exception:
        log.warning("could not drop the failed index %s", name, exc_info=True)


def _set_index(db: Database, set_id: int, status: str, ef_search: int | None,
               owner: str | None = None, error: str | None = None,
               build: dict[str, Any] | None = None) -> bool:
    """The set's index status (and calibrated ef_search); a build that ends (ready,
    skipped, failed) gives its lease up, and a failed one records why (in `index_error`
    and in its stats' `index`, which the API shows). With `owner`, only while that build
    holds the lease; without, a build's ending only while no other build holds it.
    `build` replaces the set's `index_build` (an ended build's record; None clears a
    stale one). Returns whether the row changed."""
    values: dict[str, Any] = {"index_status": status, "hnsw_ef_search": ef_search,
                              "index_build": build}
    if status != "building":
        values |= {"index_owner": None, "index_lease_expires_at": None, "index_error": error}
    if status == "failed":
        error = (error or "the index build failed")[:1000]
        values |= {"index_error": error, "stats": func.coalesce(
            EmbeddingSet.stats, text("'{}'::jsonb")).op("||")(func.jsonb_build_object(
                "index", func.jsonb_build_object("status", text("'failed'"), "error",
                                                 cast(literal(error), Text))))}
    query = update(EmbeddingSet).where(EmbeddingSet.id == set_id)
    if owner is not None:
        query = query.where(EmbeddingSet.index_owner == owner)
    elif status in ("ready", "failed"):  # a worker's build may have taken the set over
        query = query.where(EmbeddingSet.index_owner.is_(None))
    with db.session() as s:
        return s.execute(query.values(**values).returning(EmbeddingSet.id)).first() is not None


def record_index_stats(db: Database, set_id: int, stats: dict[str, Any]) -> bool:
    """Replace a ready set's `stats` with those of its ended index build (kNN label accuracy,
    the build's figures), in one statement that refuses (False) once the set is gone or
    its index is owed or being built again, so a late write never covers a newer build's."""
    with db.session() as s:
        return s.execute(update(EmbeddingSet).where(
            EmbeddingSet.id == set_id, EmbeddingSet.status == "ready",
            EmbeddingSet.index_status != "building").values(stats=stats)
            .returning(EmbeddingSet.id)).first() is not None


# -- the index build as a task: owed, sent, built under a lease, repaired ------------------

def index_owed() -> dict[str, Any]:
    """The set's columns that say it is owed an index build: given to the transaction
    that marks the set ready (`store.jobs.finish`), so a worker that dies (or a broker
    that fails) before the index task is sent leaves a set the maintenance pass finds
    (`stuck_indexes`), not one `building` for good."""
    return {"index_status": "building", "index_requested_at": text("now()"),
            "index_sent_at": None, "index_owner": None, "index_lease_expires_at": None,
            "index_attempts": 0, "index_error": None, "hnsw_ef_search": None,
            "index_build": None}


def claim_index(db: Database, set_id: int, owner: str, lease_seconds: float,
                max_attempts: int, owner_is_dead: OwnerCheck | None = None) -> str:
    """Take the lease of a set's owed index build for `owner`, atomically (the set row is
    locked meanwhile). Returns `claimed`, or why not: `missing` (the set was deleted),
    `not_owed` (not ready, or its index is not `building`), `busy` (another build holds
    a live lease, and its owner is not known dead) or `exhausted` (`max_attempts` builds
    started already: the index is marked failed). A claim by the owner that holds the
    lease (a retry of the same task) renews it and counts no new attempt."""
    with db.session() as s:
        es = s.get(EmbeddingSet, set_id, with_for_update=True)
        if es is None:
            return "missing"
        if es.status != "ready" or es.index_status != "building":
            return "not_owed"
        now = s.scalar(text("SELECT now()"))
        live = es.index_lease_expires_at is not None and es.index_lease_expires_at > now
        if es.index_owner not in (None, owner) and live and not (
                owner_is_dead is not None and owner_is_dead(es.index_owner)):
            return "busy"
        if es.index_owner != owner:
            if es.index_attempts >= max_attempts:
                reason = _gave_up(es.index_attempts)
                es.index_status, es.hnsw_ef_search, es.index_error = "failed", None, reason
                es.index_owner = es.index_lease_expires_at = es.index_build = None
                es.stats = {**(es.stats or {}), "index": {"status": "failed", "error": reason}}
                return "exhausted"
            es.index_attempts += 1
        if es.index_owner != owner:
            es.index_build = None  # an earlier build's progress is not this one's
        es.index_owner = owner
        es.index_lease_expires_at = now + dt.timedelta(seconds=lease_seconds)
        return "claimed"


def _gave_up(attempts: int) -> str:
    return (f"gave up after {attempts} attempt(s): the worker building the index stopped "
            "without finishing (crash, kill, lost host or database)")


def renew_index_lease(db: Database, set_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend a running build's lease; False when `owner` no longer holds it."""
    with db.session() as s:
        return s.execute(update(EmbeddingSet).where(
            EmbeddingSet.id == set_id, EmbeddingSet.index_owner == owner,
            EmbeddingSet.index_status == "building").values(
            index_lease_expires_at=text(f"now() + interval '{float(lease_seconds)} seconds'"))
            .returning(EmbeddingSet.id)).first() is not None


def fail_index(db: Database, set_id: int, reason: str, owner: str | None) -> bool:
    """Mark a set's index `failed` with `reason`, if it is still `building` under `owner`
    (None: under no owner). Returns whether it did."""
    with db.session() as s:
        held = s.scalar(select(EmbeddingSet.id).where(
            EmbeddingSet.id == set_id, EmbeddingSet.index_status == "building",
            EmbeddingSet.index_owner.is_not_distinct_from(owner)).with_for_update())
        if held is None:
            return False
    return _set_index(db, set_id, "failed", None, owner, error=reason)


def release_index(db: Database, set_id: int, owner: str) -> bool:
    """Take the lease from a build whose worker is gone: the index stays owed, its task
    unsent (the next pass sends it again if this one cannot)."""
    with db.session() as s:
        return s.execute(update(EmbeddingSet).where(
            EmbeddingSet.id == set_id, EmbeddingSet.index_owner == owner,
            EmbeddingSet.index_status == "building").values(
            index_owner=None, index_lease_expires_at=None, index_sent_at=None,
            index_build=None)
            .returning(EmbeddingSet.id)).first() is not None


def stuck_indexes(db: Database, owner_is_dead: OwnerCheck | None = None,
                  grace_seconds: float = 10.0, republish_seconds: float | None = None,
                  ) -> list[EmbeddingSet]:
    """Ready sets whose index is `building` with no live build: never sent (the worker
    that made the set ready died, or the broker failed, before the task was sent), sent
    `republish_seconds` ago and never taken (the broker lost it), or taken by a build
    whose lease ran out or whose owner `owner_is_dead` says is gone. A set owed its index
    in the last `grace_seconds` is left to the worker that made it ready."""
    with db.session() as s:
        now = s.scalar(text("SELECT now()"))
        rows = list(s.scalars(select(EmbeddingSet).where(
            EmbeddingSet.status == "ready", EmbeddingSet.index_status == "building",
            func.coalesce(EmbeddingSet.index_requested_at, EmbeddingSet.ready_at,
                          EmbeddingSet.created_at)
            < text(f"now() - interval '{float(grace_seconds)} seconds'"),
        ).order_by(EmbeddingSet.id)))
    stuck = []
    for es in rows:
        if es.index_owner is None:
            sent = es.index_sent_at
            if sent is None or (republish_seconds is not None
                                and sent < now - dt.timedelta(seconds=republish_seconds)):
                stuck.append(es)
        elif (es.index_lease_expires_at is None or es.index_lease_expires_at < now
              or (owner_is_dead is not None and owner_is_dead(es.index_owner))):
            stuck.append(es)
    return stuck


def live_index_builds(s: Session, set_ids: Sequence[int]) -> list[int]:
    """Those of the sets whose index a worker is building now (a live lease): a delete
    waits for them. A set owed an index that no live build holds can go (its task, when
    it comes, finds no set)."""
    if not set_ids:
        return []
    return list(s.scalars(select(EmbeddingSet.id).where(
        EmbeddingSet.id.in_(list(set_ids)), EmbeddingSet.index_status == "building",
        EmbeddingSet.index_owner.is_not(None),
        EmbeddingSet.index_lease_expires_at > func.now()).order_by(EmbeddingSet.id)))


# -- calibration ---------------------------------------------------------------------------

def calibration_queries(db: Database, es: EmbeddingSet, n: int) -> list[np.ndarray]:
    """Queries that are not in the set, so recall is not flattered by exact matches:
    half are stored vectors moved by noise of the set's per-dimension spread / 4, half
    are drawn from a Gaussian fitted to the set (the hard case for HNSW)."""
    rng = np.random.default_rng(es.id)
    picks = np.sort(rng.choice(es.n_items, size=min(n, es.n_items), replace=False))
    with db.engine.connect() as conn:
        rows = binary_rows(conn, f"SELECT {mu_sql(es)} FROM latents l WHERE l.set_id = %(s)s "
                           "AND l.item_index = ANY(%(i)s)",
                           {"s": es.id, "i": [int(i) for i in picks]})
        mean = binary_rows(conn, f"SELECT avg({mu_sql(es)}) FROM latents l "
                           "WHERE l.set_id = %(s)s", {"s": es.id})[0][0]
    sample = np.stack([r[0].to_numpy() for r in rows])
    mean, spread = mean.to_numpy(), sample.std(axis=0) + 1e-6
    half = len(sample) // 2
    moved = sample[:half] + rng.normal(size=(half, es.dim)) * spread / 4
    fitted = mean + rng.normal(size=(len(sample) - half, es.dim)) * spread
    return list(np.concatenate([moved, fitted]).astype(np.float32))


def _nearest_10(db: Database, es: EmbeddingSet, q: np.ndarray, ef: int | None) -> set[int]:
    return {h.index for h in nearest(db, es, q[None], 10, es.index_metric, None, ef)[0]}


def _calibrate(db: Database, es: EmbeddingSet, settings: Settings, n_queries: int,
               report: IndexReport) -> None:
    queries = calibration_queries(db, es, n_queries)
    exact_times, truth = [], []
    for q in queries:
        t = time.perf_counter()
        truth.append(_nearest_10(db, es, q, None))
        exact_times.append(time.perf_counter() - t)
    report.exact_ms = 1000 * float(np.median(exact_times))
    margin_target = min(1.0, settings.recall_target + 0.02)
    for ef in EF_CANDIDATES:
        times, recalls = [], []
        for q, want in zip(queries, truth, strict=True):
            t = time.perf_counter()
            got = _nearest_10(db, es, q, ef)
            times.append(time.perf_counter() - t)
            recalls.append(len(got & want) / max(1, len(want)))
        half = len(recalls) // 2  # the target must hold for both kinds of query
        recall = min(float(np.mean(recalls[:half])), float(np.mean(recalls[half:])))
        report.recall[ef], report.hnsw_ms[ef] = recall, 1000 * float(np.median(times))
        if recall >= margin_target:
            if report.hnsw_ms[ef] < report.exact_ms:
                report.ef_search = ef
            return
