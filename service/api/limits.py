"""Limits the authentication layer keeps in memory, per API process: token buckets (the
failed authentications of an address, the request rate of a key) and slots (a key's
requests in progress, its open event streams)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Buckets:
    """Token buckets by name: each refills at `rate` tokens a second up to `burst`. At most
    `capacity` are kept: the one used least recently is forgotten to make room (a bound on
    memory that never resets everyone's level at once)."""

    def __init__(self, rate: float, burst: float, capacity: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.capacity, self.clock = rate, burst, capacity, clock
        self._levels: dict[Any, list[float]] = {}

    def _level(self, name: Any) -> list[float]:
        now = self.clock()
        level = self._levels.pop(name, None)  # re-inserted last: dict order is recency
        if level is None:
            if len(self._levels) >= self.capacity:
                del self._levels[next(iter(self._levels))]
            level = [float(self.burst), now]
        else:
            level[0] = min(float(self.burst), level[0] + (now - level[1]) * self.rate)
            level[1] = now
        self._levels[name] = level
        return level

    def wait(self, name: Any) -> float:
        """Seconds until `name` has a token; 0 when it has one now (none is taken)."""
        tokens = self._level(name)[0]
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def take(self, name: Any) -> float:
        """Take a token: 0 when there was one; else the seconds until there is one (and
        nothing is taken)."""
        level = self._level(name)
        if level[0] >= 1:
            level[0] -= 1
            return 0.0
        return (1 - level[0]) / self.rate

    def give(self, name: Any) -> None:
        """Return a token taken by `take` (up to `burst`)."""
        level = self._level(name)
        level[0] = min(float(self.burst), level[0] + 1)


class Slots:
    """At most `limit` held at once per name (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: dict[Any, int] = {}

    def acquire(self, name: Any) -> bool:
        held = self.held.get(name, 0)
        if self.limit and held >= self.limit:
            return False
        self.held[name] = held + 1
        return True

    def release(self, name: Any) -> None:
        held = self.held.get(name, 0) - 1
        if held > 0:
            self.held[name] = held
        else:
            self.held.pop(name, None)
