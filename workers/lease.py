"""A running attempt's lease: an owner name that tells whether its process still exists on
this machine, and the threads that renew a job's or an index build's lease."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any

from store.db import Database
from store.indexes import renew_index_lease
from store.jobs import Claim, LeaseLost, claim, heartbeat
from store.processes import host_identity, identity_is_known, process_start

log = logging.getLogger(__name__)


def new_owner() -> str:
    """A unique name for one attempt by this process."""
    pid = os.getpid()
    return f"{host_identity()}:{pid}:{process_start(pid) or 0}:{uuid.uuid4().hex[:8]}"


def start_attempt(db: Database, job_id: int, lease_seconds: float) -> tuple[str, Claim]:
    """Claim a delivered job for a new attempt of this process: (its owner, the claim).
    A claim whose outcome is not `claimed` tells why this delivery does not run."""
    owner = new_owner()
    got = claim(db, job_id, owner, lease_seconds, owner_is_dead)
    if got.outcome != "claimed":
        log.info("delivery skipped job_id=%d outcome=%s", job_id, got.outcome)
    elif got.took_over:
        log.warning("took over job_id=%d from dead owner=%s", job_id, got.took_over)
    return owner, got


def owner_is_dead(owner: str) -> bool:
    """True only when `owner` names a process of this machine's boot and pid namespace
    that no longer exists."""
    try:
        host, pid, start, _ = owner.rsplit(":", 3)
        pid_number, start_ticks = int(pid), int(start)
    except ValueError:
        return False  # an owner written by an older version: leave it to its lease
    here = host_identity()
    if (host != here or not identity_is_known(here) or start_ticks == 0
            or not os.path.isdir("/proc")):
        return False
    return process_start(pid_number) != start_ticks


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
        """Raise LeaseLost if the thread has seen the lease go."""
        if self.lost:
            raise LeaseLost(f"job {self.job_id} is no longer held by {self.owner}")

    def confirm(self) -> None:
        """Ask the database now (before a write outside the database, such as an
        artifact upload): raise LeaseLost unless this attempt still holds the job."""
        self.check()
        self.beat()
        self.check()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # a database blip: the lease has slack for a missed beat
                log.warning("heartbeat failed job_id=%d", self.job_id, exc_info=True)


class IndexLease:
    """Renews a set's index-build lease every `lease_seconds / 3` (at most every 2 s) from
    a thread while the build runs; `lost` turns True when another build took the set over."""

    def __init__(self, db: Database, set_id: int, owner: str, lease_seconds: float) -> None:
        self.db, self.set_id, self.owner, self.lease_seconds = db, set_id, owner, lease_seconds
        self.interval = min(2.0, lease_seconds / 3)
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"index-lease-{set_id}",
                                        daemon=True)

    def __enter__(self) -> IndexLease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not renew_index_lease(self.db, self.set_id, self.owner, self.lease_seconds):
                    self.lost = True
                    return
            except Exception:  # a database blip: the lease has slack for a missed beat
                log.warning("index lease renewal failed set_id=%d", self.set_id,
                            exc_info=True)
