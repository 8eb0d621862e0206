"""What one attack costs the API's process: its memory and its /healthz answers meanwhile
(the hostile-input suite's yardstick)."""

import threading
import time
from pathlib import Path

from tests.support.processes import ApiProcess


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Probe:
    """What one attack costs the API process: its peak resident memory above the level
    before the attack (the kernel's high-water mark, reset first through clear_refs), and
    the slowest /healthz answer seen while it ran (polled every 20 ms from a thread).

        with Probe(api) as probe:
            response = send_attack()
        assert probe.grown < 100 * MiB and probe.slowest_health < 0.1
    """

    def __init__(self, api: ApiProcess, health_every: float = 0.02) -> None:
        self.api, self.every = api, health_every
        self.grown = 0
        self.slowest_health = 0.0
        self.health_failures = 0
        self.elapsed = 0.0

    def __enter__(self) -> "Probe":
        import httpx

        pid = self.api.proc.pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to VmRSS
        self.before = _status_kib(pid, "VmRSS") * 1024
        self._stop = threading.Event()
        self._health = httpx.Client(base_url=self.api.url, timeout=5)

        def poll() -> None:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    ok = self._health.get("/healthz").status_code < 500
                except Exception:
                    ok = False
                took = time.perf_counter() - started
                self.slowest_health = max(self.slowest_health, took)
                self.health_failures += not ok
                self._stop.wait(self.every)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self._started
        self._stop.set()
        self._thread.join(timeout=10)
        self._health.close()
        peak = _status_kib(self.api.proc.pid, "VmHWM") * 1024
        self.grown = max(0, peak - self.before)
