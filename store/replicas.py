"""Read replicas: which server answers a read that may run a little behind the primary
(searches, exports, outliers, samples of a ready set). Writes, and reads that must see
their own writes (a job's state, a set's listing, a key's creation), stay on the primary.

A replica's lag is measured against the primary, not taken from the replica alone: each
check samples the primary's WAL position (`pg_current_wal_lsn()`) with the time it was
read, and asks every replica how far it has replayed (`pg_last_wal_replay_lsn()`). A
replica that has replayed past the position the primary had at time t holds every write
committed before t, so its lag is at most now - t; one that has replayed everything the
primary has written lags 0. (The replica's own `pg_last_xact_replay_timestamp()` cannot
tell a replica that is idle from one whose stream broke while the primary still writes.)

A replica further behind than `max_lag_s` is skipped while the primary answers. With the
primary down, nothing new is written, so every replica that answers serves: the least
behind first (a search answered from a replica is better than none)."""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import text

from store.db import Database, is_unavailable, redacted
from store.errors import Conflict, DatabaseUnavailable, NotFound

log = logging.getLogger(__name__)
T = TypeVar("T")


def lsn(value: str) -> int:
    """A WAL position ('16/B374D848') as one integer, so positions compare."""
    match = re.fullmatch(r"([0-9A-Fa-f]+)/([0-9A-Fa-f]+)", value.strip())
    if match is None:
        raise ValueError(f"not a WAL position: {value!r}")
    return (int(match[1], 16) << 32) | int(match[2], 16)


def lag_seconds(replayed: int, samples: Sequence[tuple[float, int]], now: float) -> float:
    """How far behind a replica that has replayed up to `replayed` is, at most, given the
    primary's positions `samples` ((time, position), oldest first, the newest read just
    now): 0 when it has replayed the newest; now - t for the newest sample (t, p) with
    p <= replayed; beyond the oldest sample's age (a lower bound) when it holds none."""
    if not samples:
        raise ValueError("no sample of the primary's position")
    if replayed >= samples[-1][1]:
        return 0.0
    for at, position in reversed(samples):
        if position <= replayed:
            return max(0.0, now - at)
    return max(0.0, now - samples[0][0])


@dataclass
class Replica:
    db: Database
    name: str  # the URL without its password
    up: bool = False  # answered its last check
    lag_s: float | None = None  # at most this far behind, as of its last check
    error: str | None = None


@dataclass
class Reads:
    """The primary and its replicas, for one process. `run(fn, ...)` calls
    `fn(db, ...)` on the server that should answer a read: a replica within the lag bound
    (round robin), else the primary. A background thread (`start`) measures the lags."""

    primary: Database
    replicas: list[Replica] = field(default_factory=list)
    max_lag_s: float = 5.0
    check_s: float = 1.0
    primary_up: bool = True
    served: dict[str, int] = field(default_factory=lambda: {"primary": 0, "replica": 0})
    _samples: deque[tuple[float, int]] = field(default_factory=deque)
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def of(cls, primary: Database, urls: Sequence[str], max_lag_s: float = 5.0,
           check_s: float = 1.0, **engine_kwargs: Any) -> Reads:
        return cls(primary, [Replica(Database(u, **engine_kwargs), redacted(u)) for u in urls],
                   max_lag_s, check_s)

    def check(self) -> None:
        """Measure once: the primary's position, then every replica's replay position."""
        now = time.monotonic()
        try:
            with self.primary.engine.connect() as conn:
                position = conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one()
            self._samples.append((now, lsn(position)))
            self.primary_up = True
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            self.primary_up = False  # nothing new is written: the lags stand as they were
        keep = self.max_lag_s + 3 * self.check_s
        while len(self._samples) > 2 and now - self._samples[1][0] > keep:
            self._samples.popleft()
        for replica in self.replicas:
            self._check_replica(replica, now)

    def _check_replica(self, replica: Replica, now: float) -> None:
        try:
            with replica.db.engine.connect() as conn:
                standby, replayed = conn.execute(text(
                    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")).one()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            if replica.up:
                log.warning("replica %s unavailable: %s", replica.name, type(exc).__name__)
            replica.up, replica.error = False, type(exc).__name__
            return
        if not replica.up:
            log.info("replica %s answers", replica.name)
        replica.up, replica.error = True, None
        if not standby:  # promoted: it is a primary of its own now, behind nothing
            replica.lag_s = 0.0
        elif self.primary_up and self._samples:
            replica.lag_s = lag_seconds(lsn(replayed or "0/0"), self._samples, now)

    def choose(self) -> Replica | None:
        """The replica that should answer the next read, or None for the primary."""
        if self.primary_up:
            ready = [r for r in self.replicas
                     if r.up and r.lag_s is not None and r.lag_s <= self.max_lag_s]
        else:  # the primary is down: any replica that answers, the least behind first
            ready = sorted((r for r in self.replicas if r.up),
                           key=lambda r: float("inf") if r.lag_s is None else r.lag_s)[:1]
        return ready[next(self._turn) % len(ready)] if ready else None

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(db, *args, **kwargs)` on the chosen server. A replica that fails to answer is
        marked down until its next check and the primary answers instead; so does the
        primary when the replica has not yet replayed what was asked for (a set it does not
        know, or not yet ready there)."""
        replica = self.choose()
        if replica is None:
            self.served["primary"] += 1
            return fn(self.primary, *args, **kwargs)
        try:
            answer = fn(replica.db, *args, **kwargs)
        except (NotFound, Conflict):
            if not self.primary_up:
                raise
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            log.warning("replica %s failed a read (%s); the primary answers", replica.name,
                        type(exc).__name__)
            replica.up, replica.error = False, type(exc).__name__
        else:
            self.served["replica"] += 1
            return answer
        self.served["primary"] += 1
        return fn(self.primary, *args, **kwargs)

    def on_replica(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(db, ...)` on the first replica that answers, the least behind first: for a
        read the primary could not answer. Raises DatabaseUnavailable when none does."""
        order = sorted((r for r in self.replicas if r.up),
                       key=lambda r: float("inf") if r.lag_s is None else r.lag_s)
        for replica in order:
            try:
                answer = fn(replica.db, *args, **kwargs)
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                replica.up, replica.error = False, type(exc).__name__
                continue
            self.served["replica"] += 1
            return answer
        raise DatabaseUnavailable("neither the primary nor a replica answers")

    def status(self) -> list[dict[str, Any]]:
        """Each replica as the last check saw it: for /readyz and /metrics."""
        return [{"replica": r.name, "up": r.up, "lag_s": r.lag_s, "error": r.error,
                 "used": r.up and (not self.primary_up or (
                     r.lag_s is not None and r.lag_s <= self.max_lag_s))}
                for r in self.replicas]

    def start(self) -> None:
        """Measure every `check_s` seconds in a daemon thread (none without replicas)."""
        if not self.replicas or self._thread is not None:
            return
        self.check()
        self._thread = threading.Thread(target=self._loop, name="replica-lag", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.check_s):
            try:
                self.check()
            except Exception:  # a bug, not an outage: keep measuring, say so
                log.exception("replica check failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for replica in self.replicas:
            replica.db.dispose()
