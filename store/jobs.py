"""The jobs table is the truth: every state change of a job is one guarded transaction here.

    queued --claim--> running --finish--> succeeded | failed | cancelled
       |                 |  \\--release--> queued   (the attempt ended, the job did not)
       \\--cancel--> cancelled                      (a running job is cancelled cooperatively)

A claim takes a *lease*: an owner string per attempt (see `workers.lease.new_owner`) and
an expiry that a heartbeat renews. A task delivered twice claims once; the second delivery
sees a live lease and steps aside, unless the caller can tell that the lease's owner is a
process that no longer exists (`owner_is_dead`), in which case it takes the job over at
once. Writes of an attempt's outputs check the lease in the same transaction
(`lease_guard`), so an attempt that lost its lease can never overwrite a newer one.
A job whose worker vanished keeps its row `running` until `requeue_lost` sets it back to
`queued` (its lease expired, or its owner is known dead). Attempts are counted here, not by
Celery: a job that crashes its worker every time ends `failed` after `max_attempts`.

Ending a job and its model's (or embedding set's) status happen in one transaction
(`finish`), so no reader ever sees a ready model under a running job.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection, delete, false, func, or_, select, text, update
from sqlalchemy.orm import Session

from store.db import Database, get_row, narrowed
from store.errors import Conflict, NotFound
from store.tables import EmbeddingSet, EmbeddingSetPart, Job, Latent, Model

log = logging.getLogger(__name__)
TASKS = {"train": "latentbank.train", "embed": "latentbank.embed",
         "ingest": "latentbank.ingest"}
INDEX_TASK = "latentbank.embed_index"  # a ready set's HNSW index (workers.tasks.embed_index)
QUEUES = {"train": "train", "embed": "embed", "ingest": "ingest",
          "maintenance": "maintenance"}
WORKER_QUEUES = ",".join(QUEUES.values())  # what a worker consumes by default
TERMINAL = ("succeeded", "failed", "cancelled")
OwnerCheck = Callable[[str], bool]


class TaskSender(Protocol):
    """What publishes a task: a Celery app (`service.api.broker.task_sender`, or the worker's)."""

    def send_task(self, name: str, args: Any = ..., **options: Any) -> Any: ...


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


def publish(db: Database, sender: TaskSender, job: Job) -> bool:
    """Send a queued job's task, then record that it was sent. The one way a job's task
    reaches the broker: the API calls it right after a submission commits, the
    maintenance pass for jobs never sent (the broker was down) or requeued.

    A broker failure is logged and returns False: the job row is committed already and
    stays unpublished, so a later maintenance pass sends it. Sending twice is harmless
    (the claim lets one delivery run)."""
    try:
        sender.send_task(TASKS[job.kind], args=[job.id], queue=QUEUES[job.kind], retry=False)
    except Exception as exc:  # any broker failure
        log.warning("broker unavailable; job_id=%d stays queued until a later pass (%s)",
                    job.id, type(exc).__name__)
        return False
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job.id).values(published_at=text("now()")))
    return True


def publish_index(db: Database, sender: TaskSender, set_id: int) -> bool:
    """Send the index task of a set owed one (`store.latents.index_owed`), then record
    that it was sent: the worker that made the set ready right after that commit, the
    maintenance pass for sets whose task never came (`store.latents.stuck_indexes`). A
    broker failure returns False and leaves the set owed; sending twice is harmless (one
    build claims the set)."""
    try:
        sender.send_task(INDEX_TASK, args=[set_id], queue=QUEUES["embed"], retry=False)
    except Exception as exc:  # any broker failure
        log.warning("broker unavailable; the index of set_id=%d waits for a later pass (%s)",
                    set_id, type(exc).__name__)
        return False
    with db.session() as s:
        s.execute(update(EmbeddingSet).where(EmbeddingSet.id == set_id)
                  .values(index_sent_at=text("now()")))
    return True


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


def requeue_lost(db: Database, owner_is_dead: OwnerCheck | None = None,
                 silent_seconds: float = 6.0) -> list[int]:
    """Set back to `queued` every running job whose attempt is gone: its lease expired
    (its host vanished or stopped answering), or `owner_is_dead(owner)` says its process
    is gone and no heartbeat came for `silent_seconds` (a heartbeat may come from another
    process of the same attempt: embedding shards carry their attempt's owner). Attempts
    stay counted. Returns the ids requeued."""
    with db.session() as s:
        ids = list(s.scalars(text(
            "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
            "published_at = NULL, "
            "progress_message = 'requeued: its worker stopped answering' "
            "WHERE status = 'running' AND lease_expires_at < now() RETURNING id")))
        if owner_is_dead is None:
            return ids
        quiet = s.execute(select(Job.id, Job.lease_owner).where(
            Job.status == "running", Job.lease_owner.is_not(None),
            Job.heartbeat_at < text(f"now() - interval '{float(silent_seconds)} seconds'"))
        ).all()
        for job_id, owner in quiet:
            if owner_is_dead(owner):
                done = s.scalar(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                                  Job.status == "running")
                                .values(status="queued", lease_owner=None,
                                        lease_expires_at=None, published_at=None,
                                        progress_message="requeued: its worker process died")
                                .returning(Job.id))
                if done is not None:
                    ids.append(done)
        return ids


MAINTENANCE_LOCK = 0x1A7E47  # pg advisory lock: one maintenance pass at a time


@contextmanager
def maintenance_lock(db: Database) -> Iterator[bool]:
    """Hold the maintenance advisory lock for the block if no one else does; yields
    whether it was taken (a pass that finds it taken does nothing)."""
    with db.engine.connect() as conn:
        taken = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                  {"k": MAINTENANCE_LOCK}).scalar())
        try:
            yield taken
        finally:
            if taken:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MAINTENANCE_LOCK})
                conn.commit()


def unpublished_jobs(db: Database, grace_seconds: float = 10.0,
                     republish_seconds: float | None = None) -> list[Job]:
    """Queued jobs to (re)send: those whose task was never sent (the broker was down, or
    the job was requeued), and with `republish_seconds`, those sent that long ago but
    still not started, in case the broker lost the message (a worker killed while it was
    blocked on the queue pops a message it never keeps). Sending again is harmless: the
    claim lets one delivery run. The wait grows with the job's age (at least half of it),
    so a long backlog is not sent over and over. A job created in the last
    `grace_seconds` is left to its submitter, who publishes right after committing it."""
    lost = false()
    if republish_seconds is not None:
        lost = Job.published_at < text(
            f"now() - greatest(interval '{float(republish_seconds)} seconds', "
            "(now() - jobs.created_at) / 2)")
    with db.session() as s:
        return list(s.scalars(select(Job).where(
            Job.status == "queued", or_(Job.published_at.is_(None), lost),
            Job.created_at < text(f"now() - interval '{float(grace_seconds)} seconds'"),
        ).order_by(Job.id)))
