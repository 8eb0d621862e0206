"""The `latentbank` program as a user runs it: one command, or `latentbank up` in the
background, from a fresh shell's environment."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from service.cli.running import stack_processes
from tests.support.lanes import require_stack_lane


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
        require_stack_lane("`latentbank up`")
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
        # the key is in the data folder (0600), never in the log: see test_stack
        self.key = (data_dir / "admin.key").read_text().strip()
        assert self.key not in text
        self.info = json.loads((data_dir / "stack.json").read_text())

    def processes(self):
        """Every process of the stack (see `service.cli.running.stack_processes`)."""
        return stack_processes(self.data_dir, self.proc.pid)

    def stop(self, sig=signal.SIGTERM, timeout=120):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)
