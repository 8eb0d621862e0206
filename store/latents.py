"""Latent codes in PostgreSQL/pgvector: bulk writes, per-set HNSW indexes, kNN search.

Writes go through binary COPY whose rows are assembled by numpy as one structured array
per chunk (no per-row Python), so the database, not the client, is the limit.

One `latents` table holds every embedding set; `mu` is an unconstrained `vector`. Each
set gets its own partial expression index (pgvector's recipe for vectors of different
dimensions in one table):

    CREATE INDEX latents_mu_hnsw_<set> ON latents
        USING hnsw ((mu::vector(<dim>)) vector_l2_ops) WHERE set_id = <set>

An HNSW scan is approximate, and it filters *after* the scan: before pgvector 0.8 a
selective filter returned fewer than k rows. pgvector 0.8's iterative index scans
(`hnsw.iterative_scan`) keep scanning until enough rows pass the filter, up to
`hnsw.max_scan_tuples`. So the search plan is chosen per query: exact (a scan of the set
computing every distance) when asked, when the set is small, when the metric differs from
the index's, when calibration at build time found that the index cannot reach the recall
target or is no faster than exact search, or for a filtered query on pgvector < 0.8;
otherwise HNSW with the calibrated `ef_search`, iterative when filtered. A filtered
scan widens `ef_search` by 1 / the share of rows the planner estimates to pass (so
`ef_search` candidates that pass are weighed, and the recall calibrated without a filter
holds), unless that share says the scan would visit more than `max_scan_tuples` to find
them: then exact at once. A filtered
answer that comes back short of k (the scan gave up at max_scan_tuples, or fewer rows
match than k) is answered again exactly, so no answer is ever short because of the index.

Recall of a filtered index scan holds when the filter is unrelated to where the query
lies (1.0 at 1M rows in bench/store.py). A filter that keeps only a region far from the
query (the 3s nearest to a 5, when the latents cluster by digit) is found late by the
graph walk and recall drops (0.2-0.3 in tests/store/test_latents.py's clustered world):
ask for `exact` there.
Exact search never uses the index expression, so it keeps working, exactly, while an
index is being built.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sqlalchemy import Connection, Text, cast, delete, func, literal, or_, select, text, update
from sqlalchemy.orm import Session

from store.db import Database, get_row, is_transient, narrowed, unbounded
from store.errors import Conflict, InvalidInput, NotFound, TooLarge
from store.settings import Settings
from store.tables import EmbeddingSet, EmbeddingSetPart

log = logging.getLogger(__name__)

Metric = Literal["l2", "cosine"]
OPERATORS = {"l2": "<->", "cosine": "<=>"}
OPCLASSES = {"l2": "vector_l2_ops", "cosine": "vector_cosine_ops"}
COPY_COLUMNS = ("set_id, item_index, dataset_id, dataset_index, mu, logvar, elbo, "
                "reconstruction, kl, log_px, log_px_se, ess")
OPTIONAL = ("log_px", "log_px_se", "ess")  # NULL when not given (K = 0; se also at K = 1)
PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
PGCOPY_TRAILER = (-1).to_bytes(2, "big", signed=True)
EF_CANDIDATES = (40, 80, 160, 320, 640, 1000)
EF_MAX = 1000  # pgvector's ceiling for hnsw.ef_search


# -- embedding sets ----------------------------------------------------------------------

def create_embedding_set(db: Database, model_id: int, dataset_id: int, dim: int,
                         n_items: int, importance_samples: int = 0,
                         index_metric: Metric = "l2") -> EmbeddingSet:
    with db.session() as s:
        row = EmbeddingSet(model_id=model_id, dataset_id=dataset_id, dim=dim, n_items=n_items,
                           importance_samples=importance_samples, index_metric=index_metric,
                           status="pending")
        s.add(row)
        s.flush()
        s.add(EmbeddingSetPart(set_id=row.id, dataset_id=dataset_id, start=0, n_items=n_items,
                               status="ready"))
        return row


def get_set(db: Database, set_id: int) -> EmbeddingSet:
    return get_row(db, EmbeddingSet, set_id, "embedding set")


# -- bulk writes -------------------------------------------------------------------------

def _copy_dtype(dim: int, present: tuple[bool, ...]) -> np.dtype:
    """One PGCOPY binary row: field count, then (length, value) per column, big-endian."""
    fields: list[tuple[str, Any]] = [("nfields", ">i2")]
    for name, kind in (("set_id", ">i8"), ("item_index", ">i8"), ("dataset_id", ">i8"),
                       ("dataset_index", ">i8")):
        fields += [(f"{name}_len", ">i4"), (name, kind)]
    for name in ("mu", "logvar"):  # pgvector binary: int16 dim, int16 unused, float4[dim]
        fields += [(f"{name}_len", ">i4"), (f"{name}_dim", ">i2"), (f"{name}_unused", ">i2"),
                   (name, ">f4", (dim,))]
    for name in ("elbo", "reconstruction", "kl"):
        fields += [(f"{name}_len", ">i4"), (name, ">f8")]
    for name, given in zip(OPTIONAL, present, strict=True):
        fields += [(f"{name}_len", ">i4")] + ([(name, ">f8")] if given else [])
    return np.dtype(fields)


def copy_rows(set_id: int, first_index: int, mu: np.ndarray, logvar: np.ndarray,
              elbo: np.ndarray, reconstruction: np.ndarray, kl: np.ndarray,
              log_px: np.ndarray | None, part: tuple[int, int] = (0, 0),
              log_px_se: np.ndarray | None = None, ess: np.ndarray | None = None) -> bytes:
    """The PGCOPY binary body (no header) of one chunk of latents; `part` is the items'
    (dataset id, first position in the set)."""
    n, dim = mu.shape
    optional = (log_px, log_px_se, ess)
    rows = np.empty(n, dtype=_copy_dtype(dim, tuple(v is not None for v in optional)))
    rows["nfields"] = 12
    rows["set_id_len"], rows["set_id"] = 8, set_id
    rows["item_index_len"], rows["item_index"] = 8, np.arange(first_index, first_index + n)
    rows["dataset_id_len"], rows["dataset_id"] = 8, part[0]
    rows["dataset_index_len"] = 8
    rows["dataset_index"] = np.arange(first_index - part[1], first_index - part[1] + n)
    for name, values in (("mu", mu), ("logvar", logvar)):
        rows[f"{name}_len"], rows[f"{name}_dim"], rows[f"{name}_unused"] = 4 + 4 * dim, dim, 0
        rows[name] = values
    for name, values in (("elbo", elbo), ("reconstruction", reconstruction), ("kl", kl)):
        rows[f"{name}_len"], rows[name] = 8, values
    for name, values in zip(OPTIONAL, optional, strict=True):
        if values is None:
            rows[f"{name}_len"] = -1  # NULL
        else:
            rows[f"{name}_len"], rows[name] = 8, values
    return rows.tobytes()


def _check_chunk(mu: np.ndarray, arrays: dict[str, Any]) -> np.ndarray:
    mu = np.asarray(mu, dtype=np.float32)
    if mu.ndim != 2 or len(mu) == 0:
        raise InvalidInput(f"mu must be a non-empty (n, dim) array; got shape {mu.shape}")
    for name, values in arrays.items():
        if values is not None and len(values) != len(mu):
            raise InvalidInput(f"{name} has {len(values)} rows, mu has {len(mu)}")
    for name, values in {"mu": mu, **arrays}.items():
        if values is not None and not np.isfinite(values).all():
            raise InvalidInput(f"{name} has non-finite values")
    return mu


def part_at(db: Database, set_id: int, position: int) -> tuple[int, int]:
    """(dataset id, start) of the set's part that holds `position`."""
    with db.engine.connect() as conn:
        row = conn.execute(text(
            "SELECT dataset_id, start FROM embedding_set_parts WHERE set_id = :s "
            "AND start <= :p AND :p < start + n_items"), {"s": set_id, "p": position}).first()
    if row is None:
        raise NotFound(f"embedding set {set_id} has no item at position {position}")
    return int(row[0]), int(row[1])


def set_parts(db: Database, set_id: int) -> list[EmbeddingSetPart]:
    """The datasets the set holds, in position order."""
    with db.session() as s:
        return list(s.scalars(select(EmbeddingSetPart).where(EmbeddingSetPart.set_id == set_id)
                              .order_by(EmbeddingSetPart.start)))


@contextmanager
def latent_writer(db: Database, set_id: int, first_index: int, n_rows: int,
                  guard: Callable[[Connection], None] | None = None,
                  ) -> Iterator[Callable[..., None]]:
    """Stream one shard, items `first_index .. first_index + n_rows - 1`, into one COPY.

    Idempotent per shard: in one transaction the shard's rows are deleted, then the
    chunks given to `write(mu, logvar, elbo, reconstruction, kl, log_px=None,
    log_px_se=None, ess=None)` are
    COPYed as they come (the server parses them while the caller computes the next),
    and the transaction commits only if exactly `n_rows` rows were written. Writing a
    shard twice therefore leaves one row per item; a failure leaves the previous state.
    `guard(conn)` runs first inside the transaction (a job's lease check).
    """
    written = 0
    part = part_at(db, set_id, first_index)  # a shard never spans two parts
    with db.engine.begin() as conn:
        if guard is not None:
            guard(conn)
        conn.execute(text("DELETE FROM latents WHERE set_id = :s AND item_index >= :a "
                          "AND item_index < :b"),
                     {"s": set_id, "a": first_index, "b": first_index + n_rows})
        cursor = conn.connection.driver_connection.cursor()
        with cursor.copy(f"COPY latents ({COPY_COLUMNS}) FROM STDIN WITH (FORMAT BINARY)"
                         ) as copy:
            copy.write(PGCOPY_HEADER)

            def write(mu: np.ndarray, logvar: np.ndarray, elbo: np.ndarray,
                      reconstruction: np.ndarray, kl: np.ndarray,
                      log_px: np.ndarray | None = None, log_px_se: np.ndarray | None = None,
                      ess: np.ndarray | None = None) -> None:
                nonlocal written
                mu = _check_chunk(mu, {"logvar": logvar, "elbo": elbo,
                                       "reconstruction": reconstruction, "kl": kl,
                                       "log_px": log_px, "log_px_se": log_px_se, "ess": ess})
                if written + len(mu) > n_rows:
                    raise InvalidInput(f"shard of {n_rows} rows got {written + len(mu)}")
                copy.write(copy_rows(set_id, first_index + written, mu,
                                     np.asarray(logvar, np.float32), elbo, reconstruction, kl,
                                     log_px, part, log_px_se, ess))
                written += len(mu)

            yield write
            copy.write(PGCOPY_TRAILER)
        if written != n_rows:
            raise InvalidInput(f"shard of {n_rows} rows got only {written}")


def write_latents(db: Database, set_id: int, first_index: int, mu: np.ndarray,
                  logvar: np.ndarray, elbo: np.ndarray, reconstruction: np.ndarray,
                  kl: np.ndarray, log_px: np.ndarray | None = None,
                  chunk_rows: int = 50_000,
                  guard: Callable[[Connection], None] | None = None) -> int:
    """Write one whole shard from arrays (see `latent_writer`); returns the rows written."""
    mu = _check_chunk(mu, {"logvar": logvar, "elbo": elbo, "reconstruction": reconstruction,
                           "kl": kl, "log_px": log_px})
    n = len(mu)
    with latent_writer(db, set_id, first_index, n, guard) as write:
        for a in range(0, n, chunk_rows):
            b = min(n, a + chunk_rows)
            write(mu[a:b], logvar[a:b], elbo[a:b], reconstruction[a:b], kl[a:b],
                  None if log_px is None else log_px[a:b])
    return n


def count_latents(db: Database, set_id: int) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM latents WHERE set_id = :s"),
                                {"s": set_id}).scalar_one())


# -- index build and calibration ---------------------------------------------------------

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


def build_index(db: Database, set_id: int, settings: Settings, m: int = 16,
                ef_construction: int = 64, calibration_queries: int = 40,
                maintenance_work_mem: str = "1GB", owner: str | None = None) -> IndexReport:
    """Build the set's HNSW index (CONCURRENTLY: reads and writes go on), then calibrate.

    Calibration runs `calibration_queries` of the set's own vectors through exact and
    HNSW search at increasing ef_search, and keeps the smallest ef_search whose mean
    recall@10 reaches the target with a margin, if that is faster than exact search.

    With `owner` (the holder of the build's lease, `claim_index`) the set is `building`
    already and the outcome is written only while `owner` holds the build. A failure of
    the build or of the calibration marks the index `failed` with its reason (searches
    stay exact, the set can be deleted), unless it is the database going away: then the
    caller retries, or the maintenance pass sends the build again.
    """
    es = get_set(db, set_id)
    if es.n_items < settings.exact_search_below:
        analyze(db, "latents")
        return IndexReport("skipped", written=_set_index(db, set_id, "skipped", None, owner))
    analyze(db, "latents")
    if owner is None:
        _set_index(db, set_id, "building", None)
    name, opclass = index_name(set_id), OPCLASSES[es.index_metric]
    started = time.perf_counter()
    try:
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"SET maintenance_work_mem = '{maintenance_work_mem}'"))
            conn.execute(text("SET max_parallel_maintenance_workers = 1"))
            conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))
            conn.execute(text(
                f"CREATE INDEX CONCURRENTLY {name} ON latents USING hnsw "
                f"((mu::vector({int(es.dim)})) {opclass}) "
                f"WITH (m = {int(m)}, ef_construction = {int(ef_construction)}) "
                f"WHERE set_id = {int(set_id)}"))
        report = IndexReport("ready", build_seconds=time.perf_counter() - started)
        _calibrate(db, es, settings, calibration_queries, report)
    except Exception as exc:
        if not is_transient(exc):
            _set_index(db, set_id, "failed", None, owner, error=f"{type(exc).__name__}: {exc}")
        raise
    report.written = _set_index(db, set_id, "ready", report.ef_search, owner)
    log.info("index built set_id=%d seconds=%.1f ef_search=%s recall=%s", set_id,
             report.build_seconds, report.ef_search, report.recall)
    return report


def drop_indexes(db: Database, set_ids: Sequence[int]) -> None:
    """Drop the HNSW indexes of deleted sets (CONCURRENTLY: searches of other sets go on)."""
    if not set_ids:
        return
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for set_id in set_ids:
            conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {index_name(set_id)}"))


def blockers(s: Session, *, model_ids: Sequence[int] = (), set_ids: Sequence[int] = (),
             ) -> tuple[list[str], list[int]]:
    """The aliases naming any of the models or sets, and the queued or running jobs that
    use them: what refuses a delete."""
    from store.tables import Alias, Job

    aliases = list(s.scalars(select(Alias.name).where(or_(
        Alias.model_id.in_(list(model_ids)), Alias.embedding_set_id.in_(list(set_ids))))
        .order_by(Alias.name)))
    jobs = list(s.scalars(select(Job.id).where(
        Job.status.in_(("queued", "running")),
        or_(Job.model_id.in_(list(model_ids)), Job.embedding_set_id.in_(list(set_ids))))
        .order_by(Job.id)))
    return aliases, jobs


def refuse_if_blocked(what: str, aliases: list[str], jobs: list[int]) -> None:
    if aliases:
        names = ", ".join(f"'{a}'" for a in aliases[:5])
        raise Conflict(f"{what} is named by alias {names}: move or delete the alias first "
                       "(PUT or DELETE /v1/aliases/{name})")
    if jobs:
        raise Conflict(f"{what} is used by queued or running job "
                       f"{', '.join(map(str, jobs[:5]))}: cancel it or wait for it to end")


def delete_set(db: Database, set_id: int) -> None:
    """Delete an embedding set: its rows, then its index. Refused (Conflict) while an
    alias names it, a queued or running job uses it, or a worker builds its index (a
    live lease: an index owed but not being built does not hold the set)."""
    with db.session() as s:
        es = s.get(EmbeddingSet, set_id, with_for_update=True)
        if es is None:
            raise NotFound(f"embedding set {set_id} does not exist")
        refuse_if_blocked(f"embedding set {set_id}", *blockers(s, set_ids=[set_id]))
        if live_index_builds(s, [set_id]):
            raise Conflict(f"embedding set {set_id}'s index is being built; delete it once "
                           "the set's index_status is no longer 'building'")
        unbounded(s)  # the cascade is as large as the data
        s.execute(delete(EmbeddingSet).where(EmbeddingSet.id == set_id))  # rows cascade
    drop_indexes(db, [set_id])


def analyze(db: Database, table: str) -> None:
    """Refresh planner statistics after a bulk load (else plans assume a tiny table)."""
    if table not in ("latents", "items"):
        raise ValueError(table)
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"ANALYZE {table}"))


def _set_index(db: Database, set_id: int, status: str, ef_search: int | None,
               owner: str | None = None, error: str | None = None) -> bool:
    """The set's index status (and calibrated ef_search); a build that ends (ready,
    skipped, failed) gives its lease up, and a failed one records why (in `index_error`
    and in its stats' `index`, which the API shows). With `owner`, only while that build
    holds the lease. Returns whether the row changed."""
    values: dict[str, Any] = {"index_status": status, "hnsw_ef_search": ef_search}
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
    with db.session() as s:
        return s.execute(query.values(**values).returning(EmbeddingSet.id)).first() is not None


# -- the index build as a task: owed, sent, built under a lease, repaired ------------------

OwnerCheck = Callable[[str], bool]


def index_owed() -> dict[str, Any]:
    """The set's columns that say it is owed an index build: given to the transaction
    that marks the set ready (`store.jobs.finish`), so a worker that dies (or a broker
    that fails) before the index task is sent leaves a set the maintenance pass finds
    (`stuck_indexes`), not one `building` for good."""
    return {"index_status": "building", "index_requested_at": text("now()"),
            "index_sent_at": None, "index_owner": None, "index_lease_expires_at": None,
            "index_attempts": 0, "index_error": None, "hnsw_ef_search": None}


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
                es.index_owner = es.index_lease_expires_at = None
                es.stats = {**(es.stats or {}), "index": {"status": "failed", "error": reason}}
                return "exhausted"
            es.index_attempts += 1
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
            index_owner=None, index_lease_expires_at=None, index_sent_at=None)
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


def calibration_queries(db: Database, es: EmbeddingSet, n: int) -> list[np.ndarray]:
    """Queries that are not in the set, so recall is not flattered by exact matches:
    half are stored vectors moved by noise of the set's per-dimension spread / 4, half
    are drawn from a Gaussian fitted to the set (the hard case for HNSW)."""
    rng = np.random.default_rng(es.id)
    picks = np.sort(rng.choice(es.n_items, size=min(n, es.n_items), replace=False))
    with db.engine.connect() as conn:
        rows = conn.execute(text("SELECT mu::text FROM latents WHERE set_id = :s AND "
                                 "item_index = ANY(:i)"),
                            {"s": es.id, "i": [int(i) for i in picks]}).scalars().all()
        stats = conn.execute(text(
            f"SELECT avg(mu::vector({int(es.dim)}))::text FROM latents WHERE set_id = :s"),
            {"s": es.id}).scalar_one()
    sample = np.stack([parse_vector(r) for r in rows])
    mean, spread = parse_vector(stats), sample.std(axis=0) + 1e-6
    half = len(sample) // 2
    moved = sample[:half] + rng.normal(size=(half, es.dim)) * spread / 4
    fitted = mean + rng.normal(size=(len(sample) - half, es.dim)) * spread
    return list(np.concatenate([moved, fitted]).astype(np.float32))


def _calibrate(db: Database, es: EmbeddingSet, settings: Settings, n_queries: int,
               report: IndexReport) -> None:
    queries = calibration_queries(db, es, n_queries)
    exact_times, truth = [], []
    for q in queries:
        t = time.perf_counter()
        truth.append({h.index for h in _run(db, es, q, 10, es.index_metric, None, None)})
        exact_times.append(time.perf_counter() - t)
    report.exact_ms = 1000 * float(np.median(exact_times))
    margin_target = min(1.0, settings.recall_target + 0.02)
    for ef in EF_CANDIDATES:
        times, recalls = [], []
        for q, want in zip(queries, truth, strict=True):
            t = time.perf_counter()
            got = {h.index for h in _run(db, es, q, 10, es.index_metric, None, ef)}
            times.append(time.perf_counter() - t)
            recalls.append(len(got & want) / max(1, len(want)))
        half = len(recalls) // 2  # the target must hold for both kinds of query
        recall = min(float(np.mean(recalls[:half])), float(np.mean(recalls[half:])))
        report.recall[ef], report.hnsw_ms[ef] = recall, 1000 * float(np.median(times))
        if recall >= margin_target:
            if report.hnsw_ms[ef] < report.exact_ms:
                report.ef_search = ef
            return


# -- search ------------------------------------------------------------------------------

@dataclass
class Hit:
    index: int
    key: str
    label: str | None
    distance: float
    elbo: float
    log_px: float | None
    metadata: dict[str, Any] | None = None


@dataclass
class SearchFilter:
    label: str | list[str] | None = None
    metadata: dict[str, Any] | None = None
    elbo: tuple[float | None, float | None] | None = None
    log_px: tuple[float | None, float | None] | None = None

    def empty(self) -> bool:
        return (self.label is None and not self.metadata and self.elbo is None
                and self.log_px is None)


@dataclass
class SearchResult:
    hits: list[Hit]
    plan: str  # "exact", "hnsw(ef=N)", "hnsw-iterative(ef=N)" or "exact (after ...)"
    query: dict[str, Any] | None = None  # a key query's item: key, index, label


ITERATIVE_SCANS = (0, 8)  # the first pgvector with hnsw.iterative_scan


@dataclass(frozen=True)
class Plan:
    ef_search: int | None = None  # None: an exact scan
    iterative: bool = False  # a filtered HNSW scan that goes on until k rows pass

    def __str__(self) -> str:
        if self.ef_search is None:
            return "exact"
        return f"hnsw{'-iterative' if self.iterative else ''}(ef={self.ef_search})"


EXACT = Plan()


def parse_vector(value: str) -> np.ndarray:
    return np.asarray([float(v) for v in value.strip("[]").split(",")], dtype=np.float32)


def vector_literal(values: Sequence[float] | np.ndarray) -> str:
    return "[" + ",".join(repr(float(v)) for v in values) + "]"


def _filter_sql(flt: SearchFilter | None, params: dict[str, Any]) -> str:
    if flt is None:
        return ""
    clauses = []
    if flt.label is not None:
        labels = [flt.label] if isinstance(flt.label, str) else list(flt.label)
        params["labels"] = [str(v) for v in labels]
        clauses.append("i.label = ANY(:labels)")
    if flt.metadata:
        import json

        params["meta"] = json.dumps(flt.metadata)
        clauses.append("i.metadata @> CAST(:meta AS jsonb)")
    for column, bounds in (("elbo", flt.elbo), ("log_px", flt.log_px)):
        if bounds is None:
            continue
        lo, hi = bounds
        if lo is not None:
            params[f"{column}_lo"] = float(lo)
            clauses.append(f"l.{column} >= :{column}_lo")
        if hi is not None:
            params[f"{column}_hi"] = float(hi)
            clauses.append(f"l.{column} <= :{column}_hi")
    return "".join(f" AND {c}" for c in clauses)


def _knn_sql(es: EmbeddingSet, metric: Metric, where: str, ef_search: int | None,
             query: str) -> str:
    """The set's k (`:k`) nearest rows to `query` (an SQL vector expression) that pass
    `where`, with their items: item_index, key, label, distance, elbo, log_px, metadata."""
    op = OPERATORS[metric]
    # The index matches only the expression mu::vector(dim); plain `mu` forces exact.
    target = f"l.mu::vector({int(es.dim)})" if ef_search else "l.mu"
    distance = f"{target} {op} {query}"
    # The set id is inlined (an integer from our own row): a generic plan of a prepared
    # statement could not prove a bound parameter matches the partial index's predicate.
    set_id = int(es.id)
    if "i." in where:  # item filters (label, metadata) need the join before the LIMIT
        return (f"SELECT l.item_index, i.key, i.label, {distance} AS distance, l.elbo, "
                f"l.log_px, i.metadata FROM latents l JOIN items i "
                f"ON i.dataset_id = l.dataset_id AND i.index = l.dataset_index "
                f"WHERE l.set_id = {set_id}{where} ORDER BY {distance} LIMIT :k")
    # nearest first, then look up just those k items
    return (f"SELECT nn.item_index, i.key, i.label, nn.distance, nn.elbo, nn.log_px, "
            f"i.metadata FROM (SELECT l.item_index, l.dataset_id, l.dataset_index, "
            f"{distance} AS distance, l.elbo, l.log_px FROM latents l "
            f"WHERE l.set_id = {set_id}{where} ORDER BY {distance} LIMIT :k) nn "
            f"JOIN items i ON i.dataset_id = nn.dataset_id AND i.index = nn.dataset_index")


def _run_many(db: Database, es: EmbeddingSet, vectors: np.ndarray, k: int, metric: Metric,
              flt: SearchFilter | None, ef_search: int | None, iterative: bool = False,
              max_scan_tuples: int = 20_000) -> list[list[Hit]]:
    """The k nearest hits of each row of `vectors`, nearest first: one statement (a
    LATERAL join over the queries), one round trip."""
    params: dict[str, Any] = {"k": int(k), "qs": "{" + ",".join(
        f'"{vector_literal(v)}"' for v in vectors) + "}"}
    inner = _knn_sql(es, metric, _filter_sql(flt, params), ef_search, "q.v")
    sql = (f"SELECT q.n, nn.* FROM unnest(CAST(:qs AS vector[])) WITH ORDINALITY AS q(v, n) "
           f"CROSS JOIN LATERAL ({inner}) nn ORDER BY q.n, nn.distance")
    with db.engine.begin() as conn:
        if ef_search:
            conn.execute(text(f"SET LOCAL hnsw.ef_search = {int(max(ef_search, k))}"))
        if iterative:
            conn.execute(text("SET LOCAL hnsw.iterative_scan = strict_order"))
            conn.execute(text(f"SET LOCAL hnsw.max_scan_tuples = {int(max_scan_tuples)}"))
        rows = conn.execute(text(sql), params).all()
    hits: list[list[Hit]] = [[] for _ in range(len(vectors))]
    for r in rows:
        hits[int(r[0]) - 1].append(Hit(int(r[1]), r[2], r[3], float(r[4]), float(r[5]),
                                       None if r[6] is None else float(r[6]), r[7]))
    return hits


def _run(db: Database, es: EmbeddingSet, vector: np.ndarray, k: int, metric: Metric,
         flt: SearchFilter | None, ef_search: int | None, iterative: bool = False,
         max_scan_tuples: int = 20_000) -> list[Hit]:
    """One query's hits (`_run_many` of one vector)."""
    return _run_many(db, es, np.asarray(vector)[None], k, metric, flt, ef_search, iterative,
                     max_scan_tuples)[0]


def plan_for(es: EmbeddingSet, settings: Settings, metric: Metric, k: int,
             flt: SearchFilter | None, exact: bool, pgvector: tuple[int, ...]) -> Plan:
    """How to answer one query (see the module's docstring)."""
    filtered = flt is not None and not flt.empty()
    if (exact or es.index_status != "ready" or es.hnsw_ef_search is None
            or metric != es.index_metric or es.n_items < settings.exact_search_below
            or k > 100 or (filtered and pgvector < ITERATIVE_SCANS)):
        return EXACT
    return Plan(max(es.hnsw_ef_search, 2 * k), filtered)


def search(db: Database, settings: Settings, set_id: int, *,
           vector: Sequence[float] | np.ndarray | None = None, key: str | None = None,
           k: int = 10, metric: Metric = "l2", flt: SearchFilter | None = None,
           exact: bool = False, include_query: bool = False) -> SearchResult:
    """k nearest neighbours of a vector, or of a stored item's `mu` given its key."""
    if (vector is None) == (key is None):
        raise InvalidInput("give exactly one of 'vector' and 'key'")
    return search_many(db, settings, set_id, [vector if key is None else key], k=k,
                       metric=metric, flt=flt, exact=exact, include_query=include_query)[0]


def search_many(db: Database, settings: Settings, set_id: int,
                queries: Sequence[Sequence[float] | np.ndarray | str], *, k: int = 10,
                metric: Metric = "l2", flt: SearchFilter | None = None, exact: bool = False,
                include_query: bool = False) -> list[SearchResult]:
    """k nearest neighbours of each query (a vector, or a stored item's key: then the item
    itself is left out unless `include_query`), in one database round trip (plus one to
    look the keys up, and one exact retry for any filtered answer the index left short)."""
    es = get_set(db, set_id)
    if es.status != "ready" and es.status != "finishing":
        raise Conflict(f"embedding set {set_id} is {es.status}, not ready")
    if metric not in OPERATORS:
        raise InvalidInput(f"metric must be one of {', '.join(OPERATORS)}; got {metric!r}")
    if not 1 <= k <= 1000:
        raise InvalidInput(f"k must be between 1 and 1000; got {k}")
    if not 1 <= len(queries) <= settings.search_max_queries:
        raise InvalidInput(f"give between 1 and {settings.search_max_queries} queries; got "
                           f"{len(queries)}")
    keys = [q for q in queries if isinstance(q, str)]
    found = _items_by_key(db, es, keys) if keys else {}
    vectors = np.empty((len(queries), es.dim), np.float32)
    leave_out: list[int | None] = []
    items: list[dict[str, Any] | None] = []
    for n, query in enumerate(queries):
        if isinstance(query, str):
            vectors[n], index, label = found[query]
            leave_out.append(None if include_query else index)
            items.append({"key": query, "index": index, "label": label})
            continue
        items.append(None)
        q = np.asarray(query, dtype=np.float64)
        where = f"query {n}: " if len(queries) > 1 else ""
        if q.shape != (es.dim,):
            raise InvalidInput(f"{where}vector must have {es.dim} values; got {q.size}")
        if not np.isfinite(q).all():
            raise InvalidInput(f"{where}vector has non-finite values")
        if metric == "cosine" and not np.any(q):
            raise InvalidInput(f"{where}the cosine distance is undefined for the zero vector")
        vectors[n] = q
        leave_out.append(None)
    # a key's own item comes back first (distance 0): ask for one more, drop it below
    asked = k + (1 if any(i is not None for i in leave_out) else 0)
    plan = plan_for(es, settings, metric, asked, flt, exact, db.pgvector())
    if plan.iterative and plan.ef_search is not None:
        # To find ef_search rows that pass, the scan visits about ef_search / share rows;
        # past max_scan_tuples it would give up and the query run exactly anyway.
        share = _matching_rows(db, es, flt) / max(1, es.n_items)
        if plan.ef_search > share * settings.hnsw_max_scan_tuples:
            plan = EXACT
        else:
            # The calibrated ef_search buys its recall for ef_search candidates that all
            # count; under a filter only a share of them pass, so the candidate list is
            # widened by 1 / share (pgvector's ceiling is 1000) to keep that recall.
            plan = Plan(min(EF_MAX, max(plan.ef_search, math.ceil(plan.ef_search / share))),
                        True)
    if plan.ef_search is None and len(queries) * es.n_items > settings.search_max_exact_scan:
        raise TooLarge(f"{len(queries)} queries x {es.n_items} items is "
                       f"{len(queries) * es.n_items} distances by exact scan ({plan}: small "
                       "set, k > 100, 'exact', no index yet or a filter the index cannot "
                       f"serve); one search computes at most {settings.search_max_exact_scan} "
                       "(LATENTBANK_SEARCH_MAX_EXACT_SCAN): send fewer queries per request")
    hits = _run_many(db, es, vectors, asked, metric, flt, plan.ef_search, plan.iterative,
                     settings.hnsw_max_scan_tuples)
    said = [str(plan)] * len(queries)
    short = [n for n, h in enumerate(hits) if plan.iterative and len(h) < asked]
    if short:  # never short because of the index: those queries again, exactly
        again = _run_many(db, es, vectors[short], asked, metric, flt, None)
        for n, h in zip(short, again, strict=True):
            said[n] = f"exact (after {plan} found {len(hits[n])} of {asked})"
            hits[n] = h
    return [SearchResult([h for h in found_hits if h.index != skip][:k], plan_said, item)
            for found_hits, skip, plan_said, item in zip(hits, leave_out, said, items,
                                                         strict=True)]


def _matching_rows(db: Database, es: EmbeddingSet, flt: SearchFilter | None) -> float:
    """The planner's estimate of the set's rows that pass the filter (an EXPLAIN: no scan)."""
    params: dict[str, Any] = {}
    where = _filter_sql(flt, params)
    join = (" JOIN items i ON i.dataset_id = l.dataset_id AND i.index = l.dataset_index"
            if "i." in where else "")
    with db.engine.connect() as conn:
        plan = conn.execute(text(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM latents l{join} "
                                 f"WHERE l.set_id = {int(es.id)}{where}"), params).scalar()
    return float(plan[0]["Plan"]["Plan Rows"])


# a key's item in a set: through the part that holds the key's dataset (primary keys all
# the way: parts by set, items by (dataset, key), latents by (set, position))
_BY_KEY = ("embedding_set_parts p JOIN items i ON i.dataset_id = p.dataset_id "
           "JOIN latents l ON l.set_id = p.set_id AND l.item_index = p.start + i.index "
           "WHERE p.set_id = :s")


def _items_by_key(db: Database, es: EmbeddingSet, keys: list[str],
                  ) -> dict[str, tuple[np.ndarray, int, str | None]]:
    """`mu`, index and label of each key's item (NotFound naming the first missing keys)."""
    with db.engine.connect() as conn:
        rows = conn.execute(text(
            f"SELECT i.key, l.mu::text, l.item_index, i.label FROM {_BY_KEY} "
            "AND i.key = ANY(:keys)"),
            {"s": es.id, "keys": sorted(set(keys))}).all()
    found = {r[0]: (parse_vector(r[1]), int(r[2]), r[3]) for r in rows}
    missing = [key for key in dict.fromkeys(keys) if key not in found]
    if missing:
        named = ", ".join(repr(key) for key in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise NotFound(f"embedding set {es.id} has no item with key {named}{more}")
    return found


def get_item(db: Database, set_id: int, key: str) -> dict[str, Any]:
    """One stored item of a set by its external key: codes, ELBO terms, label, metadata."""
    get_set(db, set_id)  # NotFound for an unknown set
    with db.engine.connect() as conn:
        row = conn.execute(text(
            "SELECT l.item_index, i.key, i.label, i.metadata, l.mu::text, l.logvar::text, "
            f"l.elbo, l.reconstruction, l.kl, l.log_px, l.log_px_se, l.ess FROM {_BY_KEY} "
            "AND i.key = :key"), {"s": set_id, "key": key}).first()
    if row is None:
        raise NotFound(f"embedding set {set_id} has no item with key {key!r}")
    return {"index": int(row[0]), "key": row[1], "label": row[2], "metadata": row[3],
            "mu": parse_vector(row[4]), "logvar": parse_vector(row[5]), "elbo": row[6],
            "reconstruction": row[7], "kl": row[8], "log_px": row[9], "log_px_se": row[10],
            "ess": row[11]}


def outliers(db: Database, set_id: int, k: int = 10) -> list[Hit]:
    """The k items of lowest log p(x) (lowest ELBO when the set has no log p(x))."""
    es = get_set(db, set_id)
    column = "log_px" if es.importance_samples > 0 else "elbo"
    with db.engine.connect() as conn:
        rows = conn.execute(text(
            f"SELECT l.item_index, i.key, i.label, l.elbo, l.log_px, i.metadata FROM latents l "
            f"JOIN items i ON i.dataset_id = l.dataset_id AND i.index = l.dataset_index "
            f"WHERE l.set_id = :s ORDER BY l.{column} ASC, l.item_index LIMIT :k"),
            {"s": set_id, "k": int(k)}).all()
    return [Hit(int(r[0]), r[1], r[2], float("nan"), float(r[3]),
                None if r[4] is None else float(r[4]), r[5]) for r in rows]


def export_pages(db: Database, set_id: int, page_rows: int = 10_000,
                 ) -> Iterator[list[dict[str, Any]]]:
    """The whole set in item order, one page at a time (keyset pagination, bounded memory)."""
    get_set(db, set_id)  # NotFound for an unknown set
    after = -1
    while True:
        with db.engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT l.item_index, i.key, i.label, l.mu::text, l.logvar::text, l.elbo, "
                "l.reconstruction, l.kl, l.log_px, l.log_px_se, l.ess FROM latents l "
                "JOIN items i ON i.dataset_id = l.dataset_id AND i.index = l.dataset_index "
                "WHERE l.set_id = :s AND l.item_index > :after "
                "ORDER BY l.item_index LIMIT :n"),
                {"s": set_id, "after": after, "n": page_rows}).all()
        if not rows:
            return
        yield [{"index": int(r[0]), "key": r[1], "label": r[2],
                "mu": parse_vector(r[3]).tolist(), "logvar": parse_vector(r[4]).tolist(),
                "elbo": r[5], "reconstruction": r[6], "kl": r[7], "log_px": r[8],
                "log_px_se": r[9], "ess": r[10]} for r in rows]
        after = int(rows[-1][0])


def sample_items(db: Database, set_id: int, n: int) -> list[dict[str, Any]]:
    """About `n` items spread evenly over the set (every ceil(N / n)-th position), in item
    order, with their codes and figures: what a scatter of the set draws."""
    es = get_set(db, set_id)
    step = max(1, math.ceil(es.n_items / max(1, n)))
    with db.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT l.item_index, i.key, i.label, l.mu::text, l.elbo, l.log_px FROM latents l "
            "JOIN items i ON i.dataset_id = l.dataset_id AND i.index = l.dataset_index "
            "WHERE l.set_id = :s AND l.item_index % :step = 0 ORDER BY l.item_index LIMIT :n"),
            {"s": set_id, "step": step, "n": int(n)}).all()
    return [{"index": int(r[0]), "key": r[1], "label": r[2], "mu": parse_vector(r[3]),
             "elbo": r[4], "log_px": r[5]} for r in rows]


def mark_set(db: Database, set_id: int, **values: Any) -> None:
    with db.session() as s:
        s.execute(update(EmbeddingSet).where(EmbeddingSet.id == set_id).values(**values))


def list_sets(db: Database, *, model_id: int | None = None, status: str | None = None,
              limit: int = 100, offset: int = 0) -> list[EmbeddingSet]:
    """Embedding sets in id order, narrowed by each filter that is set."""
    query = narrowed(select(EmbeddingSet).order_by(EmbeddingSet.id).limit(limit)
                     .offset(offset), {EmbeddingSet.model_id: model_id,
                                       EmbeddingSet.status: status})
    with db.session() as s:
        return list(s.scalars(query))


def labelled_sample(db: Database, dataset_id: int, n: int, salt: str) -> list[tuple[str, str]]:
    """Up to `n` (key, label) pairs of a dataset's labelled items: a pseudo-random sample,
    the same for the same `salt`."""
    with db.engine.connect() as conn:
        return [(r[0], r[1]) for r in conn.execute(text(
            "SELECT key, label FROM items WHERE dataset_id = :d AND label IS NOT NULL "
            "ORDER BY md5(key || :salt) LIMIT :n"), {"d": dataset_id, "salt": salt, "n": n})]


def set_statistics(db: Database, set_id: int) -> dict[str, Any]:
    """The set's row count, the means of its per-item figures (nats per item), the
    Monte-Carlo standard error of the mean log p(x) (sqrt(sum se^2) / n: the items' draws
    are independent) and the mean and smallest ESS of the importance weights."""
    with db.engine.connect() as conn:
        row = conn.execute(text("SELECT count(*), avg(elbo), avg(reconstruction), avg(kl), "
                                "avg(log_px), sqrt(sum(log_px_se ^ 2)) / count(log_px_se), "
                                "avg(ess), min(ess) FROM latents WHERE set_id = :s"),
                           {"s": set_id}).one()
    mean = [None if v is None else float(v) for v in row[1:]]
    return {"n_items": int(row[0]), "mean_elbo": mean[0], "mean_reconstruction": mean[1],
            "mean_kl": mean[2], "mean_log_px": mean[3], "mean_log_px_se": mean[4],
            "ess_mean": mean[5], "ess_min": mean[6]}
