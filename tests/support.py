"""Helpers shared by the tests, the one module tests import besides the code under test:
real processes (worker, beat, `latentbank up`, the CLI, uvicorn), ports, environments and
submissions made as the API makes them."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine

from service.api.validation import sweep_configs, training_config
from service.cli.commands import beat_argv, worker_argv
from service.cli.ports import free_port
from service.cli.running import stack_processes
from store.submit import submit_sweep, submit_training


def submit_train(db, dataset, model, training, **kwargs):
    """A training submission as the API makes it: validated at the edge, then written."""
    return submit_training(db, dataset.id, training_config(dataset.item_shape, model, training),
                           **kwargs)


def submit_grid(db, dataset, model, training, grid, **kwargs):
    """A sweep as the API submits it: every grid point validated, then written."""
    return submit_sweep(db, dataset.id, sweep_configs(dataset.item_shape, model, training, grid),
                        **kwargs)


def store_untrained_model(db, settings, tmp, model):
    """A dataset of 64 random items, and a ready model (config `model`) whose files (ONNX and
    checkpoint) are a fresh, untrained VAE's: serving tests and benches need no training job.
    Returns (model id, the decoder's local .onnx path)."""
    import numpy as np

    from ingest.arrays import register_file
    from models.checkpoint import Checkpoint, save_checkpoint
    from models.config import TrainConfig, VAEConfig
    from models.export import export_vae
    from models.vae import VAE
    from store.artifacts import model_key
    from store.settings import open_artifacts
    from store.tables import Model

    data = os.path.join(tmp, "data.npy")
    np.save(data, np.random.default_rng(0).random((64, *model["input_shape"]), dtype=np.float32))
    artifacts = open_artifacts(settings)
    name = f"untrained-{os.getpid()}-{time.monotonic_ns()}"
    dataset = register_file(db, artifacts, settings, name, data).dataset
    config = VAEConfig.from_dict(model)
    vae = VAE(config)
    files = export_vae(vae, tmp)
    checkpoint = os.path.join(tmp, "checkpoint.safetensors")
    save_checkpoint(checkpoint, Checkpoint(config, vae.state_dict()))
    with db.session() as s:
        row = Model(dataset_id=dataset.id, status="ready",
                    config={"model": config.to_dict(), "training": TrainConfig().to_dict()})
        s.add(row)
        s.flush()
        model_id = row.id
    keys = {role: model_key(model_id, 1, f"{role}.onnx") for role in files}
    shas = {role: artifacts.put_file(f.path, keys[role]) for role, f in files.items()}
    artifacts.put_file(checkpoint, model_key(model_id, 1, "checkpoint.safetensors"))
    with db.session() as s:
        model = s.get(Model, model_id)
        model.checkpoint_uri = artifacts.uri(model_key(model_id, 1, "checkpoint.safetensors"))
        model.encoder_sha256, model.decoder_sha256 = shas["encoder"], shas["decoder"]
        model.encoder_uri = artifacts.uri(keys["encoder"])
        model.decoder_uri = artifacts.uri(keys["decoder"])
    return model_id, files["decoder"].path


class Worker:
    """`celery -A workers.app worker` in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str,
                 concurrency: int = 1) -> None:
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


class Served:
    """`uvicorn.Server` in a thread of the test process, on a free port."""

    def __init__(self, app):
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


def settings_of(env, **overrides):
    from store.settings import Settings

    values = {k[len("LATENTBANK_"):].lower(): v for k, v in env.items()}
    return Settings(**{**values, **overrides})


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


def wait_job(client, job_id, timeout=300):
    """The job (over the HTTP API) once it has ended; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end: {job}")


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


SYSTEM_PG = "postgresql+psycopg://postgres:secret-password@127.0.0.1:5432/postgres"


def system_pg_up():
    engine = create_engine(SYSTEM_PG, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except Exception:
        return False
    finally:
        engine.dispose()


def counts(db):
    """(datasets, items) rows stored now."""
    from sqlalchemy import func, select

    from store.tables import Dataset, Item

    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Dataset)), s.scalar(
            select(func.count()).select_from(Item))


def stored_files(artifacts):
    found = []
    for root, _, files in os.walk(artifacts.root):
        found += [os.path.join(root, f) for f in files]
    return sorted(found)


def unique_name(request):
    return f"{request.node.name}"[:190]


class ApiProcess:
    """The API as production runs it: uvicorn in a process of its own (so its memory is its
    own to measure), on a free port, with `env` (LATENTBANK_* settings)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
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
