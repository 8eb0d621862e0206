"""The jobs table is the truth: every state change of a job is one guarded UPDATE here.

    queued --claim--> running --finish--> succeeded | failed | cancelled
       \\--cancel--> cancelled        (a running job is cancelled cooperatively)

A claim takes a *lease*: an owner string per attempt and an expiry that a heartbeat
renews. A task delivered twice claims once; the second delivery sees a live lease and
steps aside. Writes of an attempt's outputs check the lease in the same transaction
(`lease_guard`), so an attempt that lost its lease can never overwrite a newer one.
A job whose worker vanished keeps its row `running` with an expired lease; `stale_jobs`
finds it and the workers' maintenance loop requeues it. Attempts are counted here, not by
Celery: a job that crashes its worker every time ends `failed` after `max_attempts`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select, text, update
from sqlalchemy.exc import IntegrityError

from store.db import Database
from store.errors import Conflict, NotFound
from store.tables import EmbeddingSet, Job, Model

TASKS = {"train": "latentbank.train", "embed": "latentbank.embed"}
QUEUES = {"train": "train", "embed": "embed"}
TERMINAL = ("succeeded", "failed", "cancelled")


class LeaseLost(Exception):
    """This attempt no longer holds the job's lease: stop without writing anything."""


def create_job(db: Database, kind: str, params: dict[str, Any], *,
               idempotency_key: str | None = None, model_id: int | None = None,
               embedding_set_id: int | None = None, sweep_id: str | None = None,
               max_attempts: int = 3) -> tuple[Job, bool]:
    """Insert a queued job; with a known idempotency key return the first job instead.

    Returns (job, created). The caller publishes the task only after this commits.
    """
    if idempotency_key is not None:
        existing = find_by_key(db, idempotency_key)
        if existing is not None:
            return existing, False
    try:
        with db.session() as s:
            job = Job(kind=kind, params=params, idempotency_key=idempotency_key,
                      model_id=model_id, embedding_set_id=embedding_set_id, sweep_id=sweep_id,
                      max_attempts=max_attempts, status="queued")
            s.add(job)
            s.flush()
            return job, True
    except IntegrityError:  # the same key raced in from another request
        existing = find_by_key(db, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return existing, False


def find_by_key(db: Database, key: str) -> Job | None:
    with db.session() as s:
        return s.scalar(select(Job).where(Job.idempotency_key == key))


def get_job(db: Database, job_id: int) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} does not exist")
        return job


def mark_published(db: Database, job_id: int) -> None:
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(published_at=text("now()")))


@dataclass
class Claim:
    """The outcome of a delivery: `claimed` (run it), or why not."""

    outcome: str  # claimed | busy | terminal | cancelled | exhausted | missing
    job: Job | None = None


def claim(db: Database, job_id: int, owner: str, lease_seconds: float) -> Claim:
    """Take the job's lease for one attempt, atomically."""
    with db.session() as s:
        job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None:
            return Claim("missing")
        if job.status in TERMINAL:
            return Claim("terminal", job)
        now = s.scalar(text("SELECT now()"))
        if job.status == "running" and job.lease_expires_at and job.lease_expires_at > now:
            return Claim("busy", job)  # alive elsewhere: this delivery steps aside
        if job.cancel_requested:
            job.status, job.finished_at = "cancelled", now
            job.progress_message = "cancelled before it started"
            return Claim("cancelled", job)
        if job.attempts >= job.max_attempts:
            job.status, job.finished_at = "failed", now
            job.error = (f"gave up after {job.attempts} attempt(s): the worker running it "
                         "stopped without finishing (crash, kill or lost host)")
            return Claim("exhausted", job)
        job.status, job.attempts = "running", job.attempts + 1
        job.lease_owner = owner
        job.lease_expires_at = now + dt.timedelta(seconds=lease_seconds)
        job.heartbeat_at = now
        job.started_at = job.started_at or now
        job.error = None
        s.flush()
        return Claim("claimed", job)


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
           message: str | None = None, **values: Any) -> None:
    """End an attempt: succeeded, failed or cancelled. Only the lease holder can."""
    if status not in TERMINAL:
        raise ValueError(status)
    extra = {"progress": 1.0} if status == "succeeded" else {}
    with db.session() as s:
        done = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                           Job.status == "running")
                         .values(status=status, error=error, finished_at=text("now()"),
                                 lease_expires_at=None, progress_message=message,
                                 eta_seconds=None, **extra, **values)
                         .returning(Job.id)).first()
    if done is None:
        raise LeaseLost(f"job {job_id} is no longer held by {owner}")


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
            job.status = "cancelled"
            job.finished_at = s.scalar(text("SELECT now()"))
            job.progress_message = "cancelled before it started"
            if job.kind == "train" and job.model_id is not None:
                s.execute(update(Model).where(Model.id == job.model_id)
                          .values(status="cancelled"))
            if job.kind == "embed" and job.embedding_set_id is not None:
                s.execute(update(EmbeddingSet).where(EmbeddingSet.id == job.embedding_set_id)
                          .values(status="cancelled"))
        s.flush()
        return job


def stale_jobs(db: Database, grace_seconds: float = 10.0) -> list[Job]:
    """Jobs to (re)publish: running with an expired lease (its worker vanished; set back
    to queued here, attempts stay counted), or queued and never published (the broker
    was down at submission). A job created in the last `grace_seconds` is left to the
    submitter, who publishes right after committing it."""
    with db.session() as s:
        s.execute(text("UPDATE jobs SET status = 'queued', lease_owner = NULL, "
                       "published_at = NULL, "
                       "progress_message = 'requeued: its worker stopped answering' "
                       "WHERE status = 'running' AND lease_expires_at < now()"))
        return list(s.scalars(select(Job).where(
            Job.status == "queued", Job.published_at.is_(None),
            Job.created_at < text(f"now() - interval '{float(grace_seconds)} seconds'"),
        ).order_by(Job.id)))
