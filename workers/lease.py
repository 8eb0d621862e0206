"""A running attempt's lease: a thread renews it and carries progress and cancellation."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import Any

from store.db import Database
from store.jobs import LeaseLost, heartbeat

log = logging.getLogger(__name__)


def new_owner() -> str:
    """A unique name for one attempt: host, process and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """Renews the job's lease every `lease_seconds / 3` (at most every 2 s) from a thread,
    writing the latest progress; `cancelled` and `lost` reflect the job row."""

    def __init__(self, db: Database, job_id: int, owner: str, lease_seconds: float) -> None:
        self.db, self.job_id, self.owner, self.lease_seconds = db, job_id, owner, lease_seconds
        self.interval = min(2.0, lease_seconds / 3)
        self.cancelled = False
        self.lost = False
        self._progress: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, fraction: float, message: str, eta_seconds: float | None = None) -> None:
        with self._lock:
            self._progress = {"progress": fraction, "message": message,
                              "eta_seconds": eta_seconds}

    def beat(self) -> None:
        with self._lock:
            progress, self._progress = self._progress, None
        try:
            self.cancelled = heartbeat(self.db, self.job_id, self.owner, self.lease_seconds,
                                       **(progress or {})) or self.cancelled
        except LeaseLost:
            self.lost = True
            self.cancelled = True  # stop the work: another attempt owns the job now

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"job {self.job_id} is no longer held by {self.owner}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # a database blip: the lease has slack for a missed beat
                log.warning("heartbeat failed job_id=%d", self.job_id, exc_info=True)
