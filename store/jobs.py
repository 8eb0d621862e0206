"""The jobs table is the truth: every state change of a job is one guarded transaction
here (the state machine and its leases: docs/internals/workers.md)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, func, select, text, update
from sqlalchemy.orm import Session

from store.db import Database, get_row, narrowed
from store.errors import Conflict, NotFound
from store.tables import EmbeddingSet, EmbeddingSetPart, Job, Latent, Model

TERMINAL = ("succeeded", "failed", "cancelled")
OwnerCheck = Callable[[str], bool]


class LeaseLost(Exception):
    """This attempt no longer holds the job's lease: stop without writing anything."""


def find_by_key(db: Database, key: str) -> Job | None:
    with db.session() as s:
        return s.scalar(select(Job).where(Job.idempotency_key == key))


def get_job(db: Database, job_id: int) -> Job:
    return get_row(db, Job, job_id, "job")


def unfinished(db: Database, job_ids: set[int]) -> set[int]:
    """Which of `job_ids` exist and have not ended (queued or running)."""
    with db.session() as s:
        return set(s.scalars(select(Job.id).where(Job.id.in_(job_ids),
                                                  Job.status.not_in(TERMINAL))))


def list_jobs(db: Database, *, status: str | None = None, kind: str | None = None,
              model_id: int | None = None, sweep_id: str | None = None, limit: int = 100,
              offset: int = 0) -> list[Job]:
    """Jobs, newest first, narrowed by each filter that is set."""
    query = narrowed(select(Job).order_by(Job.id.desc()).limit(limit).offset(offset),
                     {Job.status: status, Job.kind: kind, Job.model_id: model_id,
                      Job.sweep_id: sweep_id})
    with db.session() as s:
        return list(s.scalars(query))


def count_jobs(db: Database) -> list[tuple[str, str, int]]:
    """(kind, status, count) of every job, for the metrics endpoint."""
    with db.session() as s:
        rows = s.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind,
                                                                             Job.status))
        return [(kind, status, int(n)) for kind, status, n in rows]




@dataclass
class Claim:
    """The outcome of a delivery: `claimed` (run it), or why not."""

    outcome: str  # claimed | busy | terminal | cancelled | exhausted | missing
    job: Job | None = None
    took_over: str | None = None  # the dead owner whose attempt this claim replaced


def _end_owned(s: Session, job: Job, status: str, now: Any) -> None:
    """A job ends without an attempt running: mirror it on its model or set."""
    job.status, job.finished_at, job.lease_owner, job.lease_expires_at = status, now, None, None
    _mirror(s, job, status, discard_latents=status != "succeeded")


def _mirror(s: Session, job: Job, status: str, *, discard_latents: bool,
            model: dict[str, Any] | None = None,
            embedding_set: dict[str, Any] | None = None) -> None:
    """The model's or embedding set's row follows its job's end, in the same transaction."""
    if job.kind == "train" and job.model_id is not None:
        s.execute(update(Model).where(Model.id == job.model_id)
                  .values(status="ready" if status == "succeeded" else status,
                          updated_at=text("now()"), **(model or {})))
    append = (job.params or {}).get("append") if job.kind == "embed" else None
    if append and job.embedding_set_id is not None:
        _mirror_append(s, job, status, append, embedding_set)
        return
    if job.kind == "embed" and job.embedding_set_id is not None:
        ready = {"ready_at": text("now()")} if status == "succeeded" else {}
        s.execute(update(EmbeddingSet).where(EmbeddingSet.id == job.embedding_set_id)
                  .values(status="ready" if status == "succeeded" else status,
                          **ready, **(embedding_set or {})))
        if discard_latents:  # a set is complete or empty, never half-written
            s.execute(delete(Latent).where(Latent.set_id == job.embedding_set_id))


def _mirror_append(s: Session, job: Job, status: str, append: dict[str, Any],
                   embedding_set: dict[str, Any] | None) -> None:
    """An append's end: on success its part is ready and the set counts its items (the
    set's other columns as given); otherwise its rows and its part go. The set itself
    stays ready either way."""
    set_id, dataset_id = job.embedding_set_id, job.params["dataset_id"]
    start, n = int(append["start"]), int(append["n_items"])
    part = (EmbeddingSetPart.set_id == set_id) & (EmbeddingSetPart.dataset_id == dataset_id)
    if status == "succeeded":
        s.execute(update(EmbeddingSetPart).where(part).values(status="ready"))
        s.execute(update(EmbeddingSet).where(EmbeddingSet.id == set_id)
                  .values(n_items=start + n, **(embedding_set or {})))
        return
    s.execute(delete(Latent).where(Latent.set_id == set_id, Latent.item_index >= start,
                                   Latent.item_index < start + n))
    s.execute(delete(EmbeddingSetPart).where(part))


def claim(db: Database, job_id: int, owner: str, lease_seconds: float,
          owner_is_dead: OwnerCheck | None = None) -> Claim:
    """Take the job's lease for one attempt, atomically (the row is locked meanwhile).

    A running job with a live lease is `busy`, unless `owner_is_dead(lease_owner)` says
    its owner's process is gone: then this claim takes it over at once (a new attempt).
    """
    with db.session() as s:
        job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None:
            return Claim("missing")
        if job.status in TERMINAL:
            return Claim("terminal", job)
        now = s.scalar(text("SELECT now()"))
        took_over = None
        if job.status == "running" and job.lease_expires_at and job.lease_expires_at > now:
            if not (job.lease_owner and owner_is_dead and owner_is_dead(job.lease_owner)):
                return Claim("busy", job)  # alive elsewhere: this delivery steps aside
            took_over = job.lease_owner
        if job.cancel_requested:
            _end_owned(s, job, "cancelled", now)
            job.progress_message = "cancelled before it started"
            return Claim("cancelled", job)
        if job.attempts >= job.max_attempts:
            _end_owned(s, job, "failed", now)
            job.error = (f"gave up after {job.attempts} attempt(s): the worker running it "
                         "stopped without finishing (crash, kill or lost host)")
            return Claim("exhausted", job)
        job.status, job.attempts = "running", job.attempts + 1
        job.lease_owner = owner
        job.lease_expires_at = now + dt.timedelta(seconds=lease_seconds)
        job.heartbeat_at = now
        job.started_at = job.started_at or now
        job.error = None
        _started(s, job)
        if took_over:
            job.progress_message = "took over from a worker process that died"
        s.flush()
        return Claim("claimed", job, took_over)


def _started(s: Session, job: Job) -> None:
    """A new attempt begins: its model trains, its embedding set is (re)written and its
    progress counter starts again."""
    job.items_done = 0
    if job.kind == "train" and job.model_id is not None:
        s.execute(update(Model).where(Model.id == job.model_id)
                  .values(status="training", updated_at=text("now()")))
        job.items_total = int(job.params.get("training", {}).get("epochs") or 0) or None
    if job.kind == "embed" and (job.params or {}).get("append"):
        job.items_total = int(job.params["append"]["n_items"])  # the set stays ready
    elif job.kind == "embed" and job.embedding_set_id is not None:
        job.items_total = s.scalar(
            update(EmbeddingSet).where(EmbeddingSet.id == job.embedding_set_id)
            .values(status="writing").returning(EmbeddingSet.n_items))


def heartbeat(db: Database, job_id: int, owner: str, lease_seconds: float, *,
              progress: float | None = None, message: str | None = None,
              eta_seconds: float | None = None) -> bool:
    """Renew the lease (and record progress). Returns True if cancellation was requested.

    Raises LeaseLost when another attempt holds the job now.
    """
    values: dict[str, Any] = {
        "heartbeat_at": text("now()"),
        "lease_expires_at": text(f"now() + interval '{float(lease_seconds)} seconds'")}
    if progress is not None:
        values.update(progress=max(0.0, min(1.0, progress)), progress_message=message,
                      eta_seconds=eta_seconds)
    with db.session() as s:
        row = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                          Job.status == "running")
                        .values(**values).returning(Job.cancel_requested)).first()
    if row is None:
        raise LeaseLost(f"job {job_id} is no longer held by {owner}")
    return bool(row[0])


def lease_guard(conn: Connection, job_id: int, owner: str) -> None:
    """Inside a write transaction: lock the job row and check this attempt still owns it."""
    held = conn.execute(text("SELECT 1 FROM jobs WHERE id = :j AND lease_owner = :o AND "
                             "status = 'running' FOR SHARE"), {"j": job_id, "o": owner}).first()
    if held is None:
        raise LeaseLost(f"job {job_id} is no longer held by {owner}")


def finish(db: Database, job_id: int, owner: str, status: str, *, error: str | None = None,
           message: str | None = None, model: dict[str, Any] | None = None,
           embedding_set: dict[str, Any] | None = None, dataset_id: int | None = None,
           ) -> None:
    """End an attempt and its job: succeeded, failed or cancelled. Only the lease holder can.

    In the same transaction the job's model (training) or embedding set (embedding) takes
    the matching status (`ready` on success) plus the given column values; a failed or
    cancelled embedding set loses its partial rows; an ingest job names the dataset it
    registered (`dataset_id`). Raises LeaseLost, writing nothing,
    when this attempt no longer holds the job.
    """
    if status not in TERMINAL:
        raise ValueError(status)
    extra: dict[str, Any] = {"progress": 1.0} if status == "succeeded" else {}
    if dataset_id is not None:
        extra["dataset_id"] = dataset_id
    with db.session() as s:
        job = s.scalar(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                         Job.status == "running")
                       .values(status=status, error=error, finished_at=text("now()"),
                               lease_expires_at=None, progress_message=message,
                               eta_seconds=None, **extra)
                       .returning(Job))
        if job is None:
            raise LeaseLost(f"job {job_id} is no longer held by {owner}")
        _mirror(s, job, status, discard_latents=status != "succeeded", model=model,
                embedding_set=embedding_set)


def mark_finishing(db: Database, job_id: int, set_id: int, owner: str) -> None:
    """Every shard of the attempt is written: mark its embedding set `finishing` (searched
    exactly while its figures are checked), only while `owner` holds the job.

    The lease check and the status change are one statement: the job row is locked (FOR
    SHARE, so a concurrent claim waits for it, or it waits for the claim and then sees
    the new owner) before the set row changes. A stale finisher that checked the lease
    before a newer attempt took the job over can therefore never mark the set the newer
    attempt is writing. Raises LeaseLost, changing nothing, otherwise."""
    with db.session() as s:
        done = s.execute(text(
            "WITH held AS (SELECT id FROM jobs WHERE id = :j AND lease_owner = :o "
            "AND status = 'running' AND embedding_set_id = :s FOR SHARE) "
            "UPDATE embedding_sets SET status = 'finishing' WHERE id = :s "
            "AND status IN ('writing', 'finishing') AND EXISTS (SELECT 1 FROM held) "
            "RETURNING id"), {"j": job_id, "o": owner, "s": set_id}).first()
    if done is None:
        raise LeaseLost(f"job {job_id} is no longer held by {owner}")


METRIC_COLUMNS = ("elbo", "reconstruction", "kl", "log_px", "log_px_se", "ess",
                  "importance_samples", "loss", "beta", "lr", "active_units", "seconds")


def record_epochs(db: Database, job_id: int, owner: str, model_id: int,
                  rows: list[dict[str, Any]], checkpoint_uri: str | None = None) -> None:
    """Upsert one metric row per (model, epoch, split), count the epochs done and point
    the model at the checkpoint of its latest epoch, in one transaction, only while
    `owner` holds the job (LeaseLost otherwise). Upserts make a replayed epoch harmless."""
    cols = ", ".join(METRIC_COLUMNS)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in METRIC_COLUMNS)
    sql = text(f"INSERT INTO training_metrics (model_id, epoch, split, {cols}) VALUES "
               f"(:model_id, :epoch, :split, {', '.join(':' + c for c in METRIC_COLUMNS)}) "
               f"ON CONFLICT (model_id, epoch, split) DO UPDATE SET {updates}")
    with db.engine.begin() as conn:
        lease_guard(conn, job_id, owner)
        if rows:
            conn.execute(sql, [{"model_id": model_id,
                                **{k: r.get(k) for k in ("epoch", "split", *METRIC_COLUMNS)}}
                               for r in rows])
            conn.execute(update(Job).where(Job.id == job_id).values(
                items_done=func.greatest(Job.items_done, max(int(r["epoch"]) for r in rows))))
        if checkpoint_uri is not None:
            conn.execute(update(Model).where(Model.id == model_id)
                         .values(checkpoint_uri=checkpoint_uri, updated_at=text("now()")))


def record_shard_rows(db: Database, job_id: int, owner: str, rows: int) -> dict[str, Any]:
    """Keep an embedding attempt's shard size in its job's params (`shard_rows`), only
    while `owner` holds the job (LeaseLost otherwise); returns the params. Maintenance
    and later attempts cut the job's shards at the same positions from it, whatever their
    own `embed_shard_rows` says (two cuts would overlap and collide on the rows' keys)."""
    with db.session() as s:
        row = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                          Job.status == "running")
                        .values(params=Job.params.op("||")(
                            func.jsonb_build_object("shard_rows", int(rows))))
                        .returning(Job.params)).first()
    if row is None:
        raise LeaseLost(f"job {job_id} is no longer held by {owner}")
    return dict(row[0])


def count_done(db: Database, job_id: int, owner: str, items: int) -> tuple[int, int | None]:
    """Add `items` to the attempt's `items_done` counter (one atomic increment, so the
    processes of one attempt may count side by side); returns (done, total). Raises
    LeaseLost, counting nothing, when `owner` no longer holds the job."""
    with db.session() as s:
        row = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                          Job.status == "running")
                        .values(items_done=Job.items_done + int(items))
                        .returning(Job.items_done, Job.items_total)).first()
    if row is None:
        raise LeaseLost(f"job {job_id} is no longer held by {owner}")
    return int(row[0]), row[1]


def ingest_progress(db: Database, job_id: int, owner: str, items_done: int,
                    items_total: int | None = None) -> bool:
    """An ingest attempt's items read so far (staged units included), and of how many when
    its plan tells; only while `owner` holds the job (LeaseLost otherwise). Returns True
    when cancellation was requested (the attempt stops at its next unit)."""
    values: dict[str, Any] = {"items_done": int(items_done)}
    if items_total is not None:
        values["items_total"] = int(items_total)
    with db.session() as s:
        row = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                          Job.status == "running").values(**values)
                        .returning(Job.cancel_requested)).first()
    if row is None:
        raise LeaseLost(f"job {job_id} is no longer held by {owner}")
    return bool(row[0])


def release(db: Database, job_id: int, owner: str, reason: str) -> bool:
    """End this attempt but not the job: back to `queued` (unpublished, so the next
    maintenance pass sends it again), its attempt counted. For failures of the machinery
    (database or broker away) rather than of the job. Returns False if the lease was
    already lost (someone else decided)."""
    with db.session() as s:
        job = s.scalar(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                         Job.status == "running")
                       .values(status="queued", lease_owner=None, lease_expires_at=None,
                               published_at=None, eta_seconds=None,
                               progress_message=f"requeued: {reason}"[:500])
                       .returning(Job))
        if (job is not None and job.kind == "embed" and job.embedding_set_id is not None
                and not (job.params or {}).get("append")):  # an append's set stays ready
            s.execute(update(EmbeddingSet).where(EmbeddingSet.id == job.embedding_set_id)
                      .values(status="pending"))
        return job is not None


def request_cancel(db: Database, job_id: int) -> Job:
    """Cancel: a queued job never starts; a running one stops at its next check."""
    with db.session() as s:
        job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None:
            raise NotFound(f"job {job_id} does not exist")
        if job.status in TERMINAL:
            raise Conflict(f"job {job_id} has already {job.status}")
        job.cancel_requested = True
        if job.status == "queued":
            _end_owned(s, job, "cancelled", s.scalar(text("SELECT now()")))
            job.progress_message = "cancelled before it started"
        s.flush()
        return job
