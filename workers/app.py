"""The Celery app, configured from the settings for at-least-once delivery (the jobs table,
not Celery, decides whether a delivery runs); the main process imports everything before
the pool forks and runs no thread or torch op of ours (see docs/internals/workers.md)."""

from __future__ import annotations

import importlib
import logging
import os

from celery import Celery
from celery.signals import worker_init

from store.publishing import QUEUES, TASKS
from store.settings import get_settings

log = logging.getLogger(__name__)
MAINTENANCE_TASK = "latentbank.maintenance"
MAINTENANCE_QUEUE = QUEUES["maintenance"]
MLFLOW_TASK = "latentbank.mlflow_sync"
# Imported by the main process before the pool forks, so no child imports under a lock
# another thread held at the fork (docs/internals/workers.md).
PRELOAD = ("psycopg", "sqlalchemy.dialects.postgresql.psycopg", "redis", "kombu.transport.redis",
           "workers.tasks", "workers.training", "workers.embedding", "workers.maintenance",
           "workers.ingest")


def make_app() -> Celery:
    settings = get_settings()
    app = Celery("latentbank", include=["workers.tasks"])
    transport = {"visibility_timeout": settings.visibility_timeout}
    interval = settings.maintenance_interval
    schedule = {"maintenance": {
        "task": MAINTENANCE_TASK, "schedule": interval,
        # a pass that waited longer than one interval is superseded by the next
        "options": {"expires": interval, "queue": MAINTENANCE_QUEUE}}}
    if settings.mlflow_tracking_uri:  # the MLflow bridge (bridges/mlflow_bridge.py)
        every = settings.mlflow_sync_interval
        schedule["mlflow-sync"] = {"task": MLFLOW_TASK, "schedule": every,
                                   "options": {"expires": every, "queue": MAINTENANCE_QUEUE}}
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.broker_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        # a result stored while Redis restarts waits for it instead of failing the task
        result_backend_always_retry=True,
        result_backend_max_retries=100,  # backing off to 10 s each: about 15 minutes
        result_expires=7 * 86_400,
        task_default_queue=QUEUES["embed"],
        task_routes={TASKS["train"]: {"queue": QUEUES["train"]},
                     TASKS["ingest"]: {"queue": QUEUES["ingest"]},
                     "latentbank.embed*": {"queue": QUEUES["embed"]},
                     MAINTENANCE_TASK: {"queue": MAINTENANCE_QUEUE},
                     MLFLOW_TASK: {"queue": MAINTENANCE_QUEUE}},
        beat_schedule=schedule,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker outage is waited out, never fatal
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


app = make_app()


@worker_init.connect
def _before_fork(sender: object = None, **_: object) -> None:
    """In the main process, before the pool forks: remember the concurrency (children
    take their share of the cores) and import everything a task will need."""
    concurrency = getattr(sender, "concurrency", None)
    if concurrency:
        os.environ["LATENTBANK_WORKER_CONCURRENCY"] = str(concurrency)
    for module in PRELOAD:
        importlib.import_module(module)
