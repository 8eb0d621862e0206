"""Publishing job tasks by name, after their rows are committed."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import text

from store.db import Database
from store.jobs import QUEUES, TASKS, mark_published, stale_jobs
from store.tables import Job

log = logging.getLogger(__name__)
MAINTENANCE_LOCK = 0x1A7E47  # pg advisory lock: one maintenance pass at a time


def publish(celery_app: Any, db: Database, job: Job) -> None:
    """Send the job's task; a broker outage leaves it unpublished for a later pass."""
    celery_app.send_task(TASKS[job.kind], args=[job.id], queue=QUEUES[job.kind])
    mark_published(db, job.id)


def requeue_stale(db: Database, celery_app: Any) -> int:
    """Requeue jobs whose worker vanished and publish jobs never sent. Returns how many."""
    with db.engine.connect() as conn:
        if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                            {"k": MAINTENANCE_LOCK}).scalar():
            return 0
        try:
            jobs = stale_jobs(db)
            for job in jobs:
                log.info("publishing job job_id=%d kind=%s attempts=%d", job.id, job.kind,
                         job.attempts)
                publish(celery_app, db, job)
            return len(jobs)
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MAINTENANCE_LOCK})
            conn.commit()
