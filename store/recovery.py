"""The maintenance pass's queries: one pass at a time, attempts whose worker is gone set
back to `queued`, and queued jobs whose task is owed (never sent, or lost by the broker)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import false, or_, select, text, update

from store.db import Database
from store.jobs import OwnerCheck
from store.tables import Job


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


def stalled_embeddings(db: Database, stall_seconds: float) -> list[Job]:
    """Running embedding jobs whose attempt is live (its lease holds) but that no shard
    or finishing step has heartbeat for `stall_seconds`: the broker may have lost a
    shard's message or the chord's count (a Redis restart, seen under `make
    compose-test`), and only the lease's expiry would otherwise end the wait. Each job
    returned is marked nudged now (`published_at`, which a running job does not use
    otherwise), and nudged again no sooner than `stall_seconds` later: a job whose
    shards only queue behind other work is nudged at most lease / stall times (5 at the
    defaults) before its lease runs out, as it would have without the nudges. A job
    whose row a shard's write transaction holds (`FOR SHARE`, `store.jobs.lease_guard`,
    for the whole shard: its heartbeat waits for the commit) is skipped: that shard is
    running, however long it takes."""
    stall = f"interval '{float(stall_seconds)} seconds'"
    with db.session() as s:
        return list(s.scalars(select(Job).from_statement(text(
            "WITH quiet AS (SELECT id FROM jobs WHERE kind = 'embed' AND status = 'running' "
            f"AND lease_expires_at > now() AND heartbeat_at < now() - {stall} "
            f"AND (published_at IS NULL OR published_at < now() - {stall}) "
            "FOR NO KEY UPDATE SKIP LOCKED) "
            "UPDATE jobs SET published_at = now() FROM quiet WHERE jobs.id = quiet.id "
            "RETURNING jobs.*"))))
