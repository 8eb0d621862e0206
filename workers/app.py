"""The Celery app: `celery -A workers.app worker -Q train -P solo` (GPU hosts) or `-Q embed`.

Configured from the settings: Redis as broker and result backend, JSON only, and
at-least-once delivery (acks late, requeue when a worker is lost, prefetch 1, a
visibility timeout longer than the longest job). The jobs table, not Celery, decides
whether a delivery runs (see store.jobs). No torch op runs at import: a multi-threaded
op in the parent before fork deadlocks prefork children in OpenMP.
"""

from __future__ import annotations

import logging
import os
import threading

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown

from store.jobs import QUEUES, TASKS
from store.settings import get_settings

log = logging.getLogger(__name__)


def make_app() -> Celery:
    settings = get_settings()
    app = Celery("latentbank", include=["workers.tasks"])
    transport = {"visibility_timeout": settings.visibility_timeout}
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
        result_expires=7 * 86_400,
        task_default_queue="embed",
        task_routes={TASKS["train"]: {"queue": QUEUES["train"]},
                     "latentbank.embed*": {"queue": QUEUES["embed"]}},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


app = make_app()


@worker_init.connect
def _remember_concurrency(sender: object = None, **_: object) -> None:
    """Before the pool forks: children read it to take their share of the cores."""
    concurrency = getattr(sender, "concurrency", None)
    if concurrency:
        os.environ["LATENTBANK_WORKER_CONCURRENCY"] = str(concurrency)


@worker_process_init.connect
def _per_process(**_: object) -> None:
    """In each pool process: its own database connections and a share of the cores."""
    import torch

    from workers.context import reset_context

    reset_context()
    concurrency = int(os.environ.get("LATENTBANK_WORKER_CONCURRENCY", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, concurrency)))


_maintenance_stop = threading.Event()


@worker_ready.connect
def _start_maintenance(sender: object = None, **_: object) -> None:
    threading.Thread(target=_maintenance_loop, name="latentbank-maintenance",
                     daemon=True).start()


@worker_shutdown.connect
def _stop_maintenance(**_: object) -> None:
    _maintenance_stop.set()


def _maintenance_loop() -> None:
    from workers.context import context
    from workers.publish import requeue_stale

    interval = get_settings().maintenance_interval
    while not _maintenance_stop.wait(interval):
        try:
            requeue_stale(context().db, app)
        except Exception:  # the database or broker may be briefly away; try again later
            log.exception("maintenance pass failed")
