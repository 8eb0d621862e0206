"""Periodic maintenance, run by the beat schedule as the `latentbank.maintenance` task:
requeue jobs whose attempt is gone, then publish jobs whose task was never sent (or was
sent but seems lost).

Guarded by a PostgreSQL advisory lock, so overlapping passes (two beats, a slow pass)
are harmless: the second one finds the lock taken and does nothing.
"""

from __future__ import annotations

import logging

from store.db import Database
from store.jobs import TaskSender, maintenance_lock, publish, requeue_lost, unpublished_jobs
from workers.lease import owner_is_dead

log = logging.getLogger(__name__)


def run_maintenance(db: Database, sender: TaskSender,
                    republish_seconds: float | None = None) -> dict[str, int]:
    """One pass. Returns how many jobs were requeued and published (-1: another pass
    holds the lock)."""
    with maintenance_lock(db) as taken:
        if not taken:
            return {"requeued": -1, "published": -1}
        requeued = requeue_lost(db, owner_is_dead)
        for job_id in requeued:
            log.warning("requeued job_id=%d: its attempt is gone", job_id)
        jobs = unpublished_jobs(db, republish_seconds=republish_seconds)
        published = 0
        for job in jobs:
            log.info("publishing job job_id=%d kind=%s attempts=%d", job.id, job.kind,
                     job.attempts)
            published += publish(db, sender, job)
        return {"requeued": len(requeued), "published": published}
