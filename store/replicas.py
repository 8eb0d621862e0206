"""Read replicas: which server answers a read that may run a little behind the primary
(searches, exports, outliers, samples of a ready set). Writes, and reads that must see
their own writes (a job's state, a set's listing, a key's creation), stay on the primary.

A replica's lag is measured against the primary, not taken from the replica alone: each
check samples the primary's WAL position (`pg_current_wal_lsn()`) with the time it was
read, and asks every replica how far it has replayed (`pg_last_wal_replay_lsn()`). A
replica that has replayed past the position the primary had at time t holds every write
committed before t: it is `holds_since` t, and its lag is at most now - t (0 when it has
replayed everything the primary has written). The time is kept per replica, so a replica
whose replay stopped an hour ago shows an hour, whatever the window of samples kept. (The
replica's own `pg_last_xact_replay_timestamp()` cannot tell a replica that is idle from
one whose stream broke while the primary still writes.) A server that is not in recovery
(promoted) or belongs to another cluster (another system identifier) is not a replica of
this primary, and is never used.

While the primary answers checks, lags are measured; while it does not, nothing new is
written, so each replica's lag stands as last measured. A replica further behind than
`max_lag_s` (as of its last check, so up to `check_s` more) is skipped; a replica never
measured is not used. The checks use connections of their own, so a busy request pool
neither marks a server down nor delays a check."""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import text

from store.db import Database, is_transient, is_unavailable, redacted
from store.errors import Conflict, NotFound

log = logging.getLogger(__name__)
T = TypeVar("T")


def lsn(value: str) -> int:
    """A WAL position ('16/B374D848') as one integer, so positions compare."""
    match = re.fullmatch(r"([0-9A-Fa-f]+)/([0-9A-Fa-f]+)", value.strip())
    if match is None:
        raise ValueError(f"not a WAL position: {value!r}")
    return (int(match[1], 16) << 32) | int(match[2], 16)


def holds_since(replayed: int, samples: Sequence[tuple[float, int]]) -> float | None:
    """The time of the newest primary position (`samples`: (time, position), oldest
    first) that a replica which has replayed up to `replayed` holds, or None for none."""
    for at, position in reversed(samples):
        if position <= replayed:
            return at
    return None


def first_line(exc: BaseException) -> str:
    message = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0][:200]}" if message else type(exc).__name__


@dataclass
class Replica:
    db: Database  # reads of requests
    name: str  # the URL without its password
    probe: Database | None = None  # the checks' own connection
    up: bool = False  # answered its last check as a standby of this primary
    holds: float | None = None  # holds every write the primary committed by this time
    lag_s: float | None = None  # at most this far behind, as of its last measurement
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
    probe: Database | None = None  # the primary, for the checks
    primary_up: bool = True
    served: dict[str, int] = field(default_factory=lambda: {"primary": 0, "replica": 0})
    system_id: int | None = None  # the primary's cluster
    _samples: deque[tuple[float, int]] = field(default_factory=deque)
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def of(cls, primary: Database, urls: Sequence[str], max_lag_s: float = 5.0,
           check_s: float = 1.0, **engine_kwargs: Any) -> Reads:
        """Engines for each replica (one pool for requests, one connection for checks);
        a URL that cannot be read is refused at once, naming its position."""
        probe_kwargs = {**engine_kwargs, "pool_size": 1, "max_overflow": 0}
        replicas = []
        for n, url in enumerate(urls, 1):
            try:
                replicas.append(Replica(Database(url, **engine_kwargs), redacted(url),
                                        Database(url, **probe_kwargs)))
            except Exception as exc:
                raise ValueError(
                    f"LATENTBANK_DATABASE_READ_URL: replica {n} of {len(urls)} is not a URL "
                    f"SQLAlchemy can read ({type(exc).__name__}); a multi-host one is "
                    f"written postgresql://user:pw@/db?host=h1:5432&host=h2:5432") from None
        probe = Database(primary.url, **probe_kwargs) if replicas else None
        return cls(primary, replicas, max_lag_s, check_s, probe)

    def check(self) -> None:
        """Measure once: the primary's position, then every replica's replay position."""
        now = time.monotonic()
        try:
            with (self.probe or self.primary).engine.connect() as conn:
                position, system_id = conn.execute(text(
                    "SELECT pg_current_wal_lsn()::text, (SELECT system_identifier "
                    "FROM pg_control_system())")).one()
            self._samples.append((now, lsn(position)))
            self.system_id = int(system_id)
            if not self.primary_up:
                log.info("primary answers again: replica lags are measured again")
            self.primary_up = True
        except Exception as exc:
            if not is_transient(exc):
                raise
            if self.primary_up:
                log.warning("primary unavailable (%s): replica lags stand as last measured",
                            first_line(exc))
            self.primary_up = False
        keep = self.max_lag_s + 3 * self.check_s
        while len(self._samples) > 2 and now - self._samples[1][0] > keep:
            self._samples.popleft()
        for replica in self.replicas:
            try:
                self._check_replica(replica, now)
            except Exception as exc:  # one replica's trouble is its own
                self._mark(replica, first_line(exc))

    def _mark(self, replica: Replica, error: str | None) -> None:
        if error is not None and error != replica.error:
            log.warning("replica %s not used: %s", replica.name, error)
        elif error is None and replica.error is not None:
            log.info("replica %s answers again", replica.name)
        replica.up, replica.error = error is None, error

    def _check_replica(self, replica: Replica, now: float) -> None:
        with (replica.probe or replica.db).engine.connect() as conn:
            standby, replayed, system_id = conn.execute(text(
                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, "
                "(SELECT system_identifier FROM pg_control_system())")).one()
        if not standby:
            replica.holds, replica.lag_s = None, None
            return self._mark(replica, "not in recovery (promoted?): not a replica")
        if self.system_id is not None and int(system_id) != self.system_id:
            replica.holds, replica.lag_s = None, None
            return self._mark(replica, "a standby of another cluster (system identifier "
                                       f"{system_id}, the primary's {self.system_id})")
        if self.primary_up and self._samples:
            position = lsn(replayed or "0/0")
            held = now if position >= self._samples[-1][1] else holds_since(
                position, self._samples)
            if held is not None and (replica.holds is None or held > replica.holds):
                replica.holds = held
            replica.lag_s = math.inf if replica.holds is None else now - replica.holds
        self._mark(replica, None)

    def _within(self) -> list[Replica]:
        return [r for r in self.replicas
                if r.up and r.lag_s is not None and r.lag_s <= self.max_lag_s]

    def choose(self) -> Replica | None:
        """The replica that should answer the next read, or None for the primary."""
        ready = self._within()
        return ready[next(self._turn) % len(ready)] if ready else None

    def _count(self, server: str) -> None:
        with self._lock:
            self.served[server] += 1

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(db, *args, **kwargs)` on the chosen server. The primary answers instead when
        the replica fails to (marked down until its next check if its connection failed)
        or has not yet replayed what was asked for (a set it does not know, or not yet
        ready there); with the primary down, the replica's answer stands."""
        replica = self.choose()
        if replica is None:
            self._count("primary")
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
                        first_line(exc))
            if is_transient(exc):  # its server, not its busy pool
                replica.up, replica.error = False, first_line(exc)
        else:
            self._count("replica")
            return answer
        self._count("primary")
        return fn(self.primary, *args, **kwargs)

    def fresh(self, on_primary: Callable[..., T], on_replica: Callable[..., T], *args: Any,
              ) -> tuple[T, str]:
        """(answer, "primary" | "replica"): `on_primary(primary, *args)`, or, when the
        primary is down (its check failed, or this call's connection did; not a busy pool
        or a timeout), `on_replica(replica, *args)` on a replica within the bound, the
        least behind first. For reads that must be fresh while the primary answers (key
        checks, aliases). With no replica able to, the primary's answer or error."""
        failure: Exception | None = None
        if self.primary_up or not self.replicas:
            try:
                return on_primary(self.primary, *args), "primary"
            except Exception as exc:
                if not is_transient(exc) or not self.replicas:
                    raise
                failure = exc
        for replica in sorted(self._within(), key=lambda r: r.lag_s or 0.0):
            try:
                answer = on_replica(replica.db, *args)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                replica.up, replica.error = False, first_line(exc)
                continue
            self._count("replica")
            return answer, "replica"
        if failure is not None:
            raise failure
        return on_primary(self.primary, *args), "primary"

    def status(self) -> list[dict[str, Any]]:
        """Each replica as the last check saw it: for /readyz and /metrics."""
        return [{"replica": r.name, "up": r.up, "lag_s": r.lag_s, "error": r.error,
                 "used": r.up and r.lag_s is not None and r.lag_s <= self.max_lag_s}
                for r in self.replicas]

    def start(self) -> None:
        """Measure every `check_s` seconds in a daemon thread (none without replicas)."""
        if not self.replicas or self._thread is not None:
            return
        self._measure()
        self._thread = threading.Thread(target=self._loop, name="replica-lag", daemon=True)
        self._thread.start()

    def _measure(self) -> None:
        try:
            self.check()
        except Exception:  # a bug, not an outage: keep measuring, say so
            log.exception("replica check failed")

    def _loop(self) -> None:
        while not self._stop.wait(self.check_s):
            self._measure()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for database in (self.probe, *(r.db for r in self.replicas),
                         *(r.probe for r in self.replicas)):
            if database is not None:
                database.dispose()

