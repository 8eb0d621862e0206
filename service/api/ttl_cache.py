"""A small dict whose entries expire: hot paths (keys, ready models) skip a database round
trip."""

from __future__ import annotations

import time
from typing import Any


class TTLCache:
    """A small dict whose entries expire: hot paths skip a database round trip."""

    def __init__(self, seconds: float, capacity: int = 10_000) -> None:
        self.seconds, self.capacity = seconds, capacity
        self._items: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any) -> Any:
        hit = self._items.get(key)
        if hit is None or hit[0] < time.monotonic():
            self._items.pop(key, None)
            return None
        return hit[1]

    def put(self, key: Any, value: Any) -> None:
        if len(self._items) >= self.capacity:
            self._items.clear()
        self._items[key] = (time.monotonic() + self.seconds, value)

    def pop(self, key: Any) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()
