"""Helpers shared by the tests that run real processes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class Worker:
    """`celery -A workers.app worker` in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str,
                 concurrency: int = 1) -> None:
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker",
             "-Q", "train,embed,maintenance", "-P", "prefork", "-c", str(concurrency),
             "-n", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
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
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "beat", "--schedule",
             str(log_dir / f"{name}.schedule"), "--pidfile=", "--loglevel", "INFO"],
            env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
