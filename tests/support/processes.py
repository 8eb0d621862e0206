"""The service's processes as tests start them: a Celery worker and beat, the API in uvicorn
(in a thread or a process of its own), and how to find, signal and end them."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from service.cli.commands import beat_argv, worker_argv
from service.cli.ports import free_port
from tests.support.lanes import require_stack_lane


class Worker:
    """`celery -A workers.app worker` in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str,
                 concurrency: int = 1) -> None:
        require_stack_lane("a Celery worker")
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(
            worker_argv(concurrency=concurrency, pool="prefork", name=f"{name}@%h"),
            env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True)
        deadline = time.monotonic() + 90
        while "ready." not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"worker {name} did not start:\n{self.log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Warm shutdown: SIGTERM to the main process only."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """kill -9 of the whole worker: main process and pool children."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def pool_children(self) -> list[int]:
        """The pids of the prefork pool's processes."""
        return children_of(self.proc.pid)


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Beat:
    """`celery -A workers.app beat` (the maintenance schedule), logging to a file."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "beat") -> None:
        require_stack_lane("Celery beat")
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(
            beat_argv(str(log_dir / f"{name}.schedule")),
            env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True)

    def stop(self) -> None:
        terminate(self.proc)


def terminate(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Served:
    """`uvicorn.Server` in a thread of the test process, on a free port."""

    def __init__(self, app):
        require_stack_lane("uvicorn")
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the API did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ApiProcess:
    """The API as production runs it: uvicorn in a process of its own (so its memory is its
    own to measure), on a free port, with `env` (LATENTBANK_* settings)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        require_stack_lane("uvicorn")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.api.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=open(log, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API did not start:\n{log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        terminate(self.proc)
