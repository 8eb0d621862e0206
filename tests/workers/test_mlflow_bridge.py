"""The MLflow bridge against a real `mlflow server` (SQLite backend store, artifacts proxied
into a local folder) started from the test's own MLflow virtualenv (`make test` builds
.venv-mlflow): runs with their parameters, tags and every epoch's metrics exactly once,
registered versions whose ONNX files are latentbank's byte for byte and serve the same
decode, aliases in step, a dead server that costs a job nothing, sweeps as parent runs."""

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import text

from bridges.mlflow_bridge import epoch_metrics, sync_pass
from service.cli.ports import free_port
from store.aliases import delete_alias, set_alias
from store.jobs import get_job
from store.mlflow_sync import bridge, job_sync_state
from store.publishing import publish
from store.registry import delete_model
from tests.support import Beat, Served, Worker, submit_grid, submit_train, whole_stack
from tests.support.waiting import wait

# Minutes of a real MLflow server and deployed stacks: the system lane (`make test-system`,
# which builds .venv-mlflow), so `make test` stays the everyday lane.
pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
MLFLOW_BIN = Path(os.environ.get("LATENTBANK_TEST_MLFLOW_VENV", ROOT / ".venv-mlflow")) / "bin"
EXPERIMENT = "latentbank-tests"
MODEL = {"family": "mlp", "latent_dim": 4, "hidden": [32], "likelihood": "bernoulli"}
TRAINING = {"epochs": 4, "batch_size": 64, "lr": 0.003, "seed": 3, "importance_samples": 8,
            "eval_importance_samples": 4}
KEYS = ("train/elbo", "train/kl", "val/elbo", "val/log_px", "lr", "epoch_seconds")


class MlflowServer:
    """`mlflow server` in its own process group; stop() and start() for outages."""

    def __init__(self, root: Path):
        if not (MLFLOW_BIN / "mlflow").exists():
            raise RuntimeError(f"no MLflow server at {MLFLOW_BIN}: `make test-system` builds it "
                               "(make .venv-mlflow/.installed)")
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self):
        log = open(self.root / "server.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(MLFLOW_BIN / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n"
                                   + (self.root / "server.log").read_text()[-3000:])
            time.sleep(0.3)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
@whole_stack
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mlflow_client(mlflow_server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)


@pytest.fixture(scope="module")
def enabled(db, mlflow_server, start_worker):
    """The bridge switched on for this server before any job of this module is made, and a
    worker (without the bridge: the tests run its passes) to train them."""
    start_worker()
    return bridge(db, mlflow_server.uri)


def one_pass(db, artifacts, server, **kwargs):
    """A whole pass of this process's own (waiting while the deployed stack's beat-sent
    pass holds the lock, once that stack runs)."""
    return wait("the bridge's lock", lambda: (r := sync_pass(
        db, artifacts, server.uri, EXPERIMENT, timeout=5, **kwargs)) and not r.skipped and r,
        timeout=120, every=0.2)


def train(db, sender, dataset, **training):
    job, _ = submit_train(db, dataset, MODEL, {**TRAINING, **training})
    publish(db, sender, job)
    return job


def wait_job(db, job_id, timeout=240):
    return wait(f"job {job_id} to end",
                lambda: (j := get_job(db, job_id)).status in ("succeeded", "failed",
                                                              "cancelled") and j,
                timeout=timeout, every=0.25)


def recorded(db, model_id):
    """latentbank's own metric rows, read with SQL here (not through the bridge)."""
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            "SELECT * FROM training_metrics WHERE model_id = :m ORDER BY epoch, split"),
            {"m": model_id})]


def run_of(db, server, model_id):
    with db.engine.connect() as conn:
        return conn.execute(text("SELECT * FROM mlflow_runs WHERE tracking_uri = :u AND "
                                 "model_id = :m"), {"u": server.uri, "m": model_id}).first()


def assert_history_is_latentbanks(client, run_id, rows):
    """Every epoch's metrics in MLflow exactly once, each value the recorded one."""
    epochs = sorted({r["epoch"] for r in rows})
    for key in KEYS:
        split, _, col = key.partition("/") if "/" in key else ("train", "", key)
        col = {"epoch_seconds": "seconds"}.get(col, col)
        expected = {r["epoch"]: r[col] for r in rows
                    if r["split"] == split and r[col] is not None}
        history = client.get_metric_history(run_id, key)
        steps = [m.step for m in history]
        assert sorted(steps) == sorted(expected), (key, steps, expected)  # each once
        for m in history:
            assert m.value == pytest.approx(expected[m.step], rel=1e-12, abs=1e-12), key
    assert epochs == list(range(1, max(epochs) + 1))


@pytest.fixture(scope="module")
def trained(db, celery_client, worker_artifacts, digits_dataset, mlflow_server, enabled):
    """One model trained (and synced once it is ready) for the tests that read it."""
    job = train(db, celery_client, digits_dataset)
    assert wait_job(db, job.id).status == "succeeded"
    report = one_pass(db, worker_artifacts, mlflow_server)
    assert report.stopped is None and not report.errors, report
    return job


def test_a_training_job_is_a_run_with_its_params_tags_metrics_and_status(
        db, trained, mlflow_server, mlflow_client, digits_dataset):
    record = run_of(db, mlflow_server, trained.model_id)
    run = mlflow_client.get_run(record.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["latentbank.model_id"] == str(trained.model_id)
    assert tags["latentbank.job_id"] == str(trained.id)
    assert tags["latentbank.dataset_id"] == str(digits_dataset.id)
    assert tags["latentbank.dataset_checksum"] == digits_dataset.checksum
    params = run.data.params
    assert params["model.latent_dim"] == "4" and params["model.hidden"] == "[32]"
    assert params["training.epochs"] == "4" and params["training.lr"] == "0.003"
    assert params["registered_model"] == digits_dataset.name
    rows = recorded(db, trained.model_id)
    assert_history_is_latentbanks(mlflow_client, record.run_id, rows)
    summary = get_job(db, trained.id)
    assert summary.items_done == 4
    heldout = mlflow_client.get_metric_history(record.run_id, "heldout/log_px")
    with db.engine.connect() as conn:
        model_summary = conn.execute(text("SELECT summary FROM models WHERE id = :m"),
                                     {"m": trained.model_id}).scalar()
    assert [m.value for m in heldout] == [pytest.approx(model_summary["heldout_log_px"])]
    state = job_sync_state(db, trained.id)
    assert state["in_sync"] and state["run_id"] == record.run_id, state
    assert state["epochs_logged"] == state["epochs_recorded"] == 4


def test_the_ready_model_is_a_registered_version_with_latentbanks_onnx_files(
        db, trained, mlflow_server, mlflow_client, worker_artifacts, tmp_path):
    record = run_of(db, mlflow_server, trained.model_id)
    version = mlflow_client.get_model_version(record.registered_name,
                                              record.registered_version)
    assert version.run_id == record.run_id
    assert version.tags["latentbank.model_id"] == str(trained.model_id)
    with db.engine.connect() as conn:
        model = conn.execute(text("SELECT * FROM models WHERE id = :m"),
                             {"m": trained.model_id}).first()
    for role in ("decoder", "encoder"):
        local = mlflow_client.download_artifacts(record.run_id, role, str(tmp_path))
        got = (Path(local) / "model.onnx").read_bytes()
        mine = tmp_path / f"{role}-latentbank.onnx"
        worker_artifacts.get_file(worker_artifacts.key_of(getattr(model, f"{role}_uri")),
                                  str(mine))
        assert got == mine.read_bytes(), role  # byte for byte
        assert hashlib.sha256(got).hexdigest() == getattr(model, f"{role}_sha256")
        files = {p.name for p in Path(local).iterdir()}
        assert files <= {"MLmodel", "model.onnx", "conda.yaml", "python_env.yaml",
                         "requirements.txt"}, files  # no copy of the weights beside it
        mlmodel = (Path(local) / "MLmodel").read_text()
        assert "onnx:" in mlmodel and "signature:" in mlmodel, mlmodel
    summary = json.loads(Path(mlflow_client.download_artifacts(
        record.run_id, "summary.json", str(tmp_path / "s"))).read_text())
    assert summary["heldout_log_px"] == model.summary["heldout_log_px"]


def test_a_served_version_decodes_as_latentbank_does(
        db, trained, mlflow_server, worker_settings, tmp_path):
    """`mlflow models serve` of the registered version against latentbank's /decode on
    the same latent vectors."""
    from service.api.app import create_app
    from store.keys import create_key

    record = run_of(db, mlflow_server, trained.model_id)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    serve = subprocess.Popen(
        [str(MLFLOW_BIN / "mlflow"), "models", "serve", "-m",
         f"models:/{record.registered_name}/{record.registered_version}",
         "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri,
             "PATH": f"{MLFLOW_BIN}:{os.environ['PATH']}"})  # its scoring server's uvicorn
    api = Served(create_app(worker_settings))
    try:
        key = create_key(db, "mlflow-test", ["read"]).key
        z = np.random.default_rng(0).normal(size=(5, MODEL["latent_dim"])).astype(np.float32)
        ours = httpx.post(f"{api.url}/v1/models/{trained.model_id}/decode",
                          json={"z": z.tolist()}, timeout=60,
                          headers={"Authorization": f"Bearer {key}"})
        assert ours.status_code == 200, ours.text
        x_ours = np.asarray(ours.json()["x"], dtype=np.float32)

        def answer():
            if serve.poll() is not None:
                raise AssertionError("mlflow models serve exited:\n"
                                     + (tmp_path / "serve.log").read_text()[-3000:])
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/invocations",
                               json={"inputs": {"z": z.tolist()}}, timeout=30)
            except httpx.HTTPError:
                return None
            return r

        theirs = wait("mlflow models serve to answer", answer, timeout=180, every=0.5)
        assert theirs.status_code == 200, theirs.text
        predictions = theirs.json()["predictions"]
        x_theirs = np.asarray(predictions["probs"], dtype=np.float32)
        assert x_theirs.shape == x_ours.shape == (5, 1, 8, 8)  # the digits' item shape
        np.testing.assert_allclose(x_theirs, x_ours, rtol=1e-6, atol=1e-7)
    finally:
        api.stop()
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=30)


def test_aliases_follow_latentbanks(db, celery_client, trained, digits_dataset, worker_artifacts,
                                    mlflow_server, mlflow_client):
    second = train(db, celery_client, digits_dataset, epochs=2)
    assert wait_job(db, second.id).status == "succeeded"
    one_pass(db, worker_artifacts, mlflow_server)
    first_rec = run_of(db, mlflow_server, trained.model_id)
    second_rec = run_of(db, mlflow_server, second.model_id)
    name = first_rec.registered_name
    assert second_rec.registered_name == name  # one dataset: versions of one model
    assert first_rec.registered_version != second_rec.registered_version

    set_alias(db, "champion", "model", trained.model_id)
    set_alias(db, "has.dot", "model", trained.model_id)  # a name MLflow refuses
    report = one_pass(db, worker_artifacts, mlflow_server)
    assert report.stopped is None
    assert any("has.dot" in e for e in report.errors), report.errors
    assert mlflow_client.get_model_version_by_alias(name, "champion").version == \
        first_rec.registered_version

    set_alias(db, "champion", "model", second.model_id)  # moved
    one_pass(db, worker_artifacts, mlflow_server)
    assert mlflow_client.get_model_version_by_alias(name, "champion").version == \
        second_rec.registered_version

    delete_alias(db, "champion")
    delete_alias(db, "has.dot")
    one_pass(db, worker_artifacts, mlflow_server)
    assert "champion" not in mlflow_client.get_registered_model(name).aliases

    delete_model(db, worker_artifacts, second.model_id)  # the version stays, marked
    report = one_pass(db, worker_artifacts, mlflow_server)
    assert report.stopped is None and not report.errors, report
    kept = mlflow_client.get_model_version(name, second_rec.registered_version)
    assert "latentbank.deleted" in kept.tags
    assert mlflow_client.get_run(second_rec.run_id).info.status == "FINISHED"


class LosesAnswers:
    """An MlflowClient whose next log-batch of metrics loses its answer: `after` the
    server has stored it, or before it reaches the server."""

    def __init__(self, client, after):
        self.client, self.after, self.armed = client, after, True

    def __getattr__(self, name):
        return getattr(self.client, name)

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        if self.armed and metrics:
            self.armed = False
            if self.after:
                self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
            raise ConnectionError("the answer was lost")
        return self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)


class Counting:
    """An MlflowClient that notes the epochs of each metric batch it sends."""

    def __init__(self, client):
        self.client, self.epochs_sent = client, []

    def __getattr__(self, name):
        return getattr(self.client, name)

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        if metrics and not metrics[0].key.startswith("heldout/"):
            self.epochs_sent += sorted({m.step for m in metrics})
        return self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)


@pytest.mark.parametrize("after", [True, False], ids=["answer-lost", "request-lost"])
def test_a_lost_answer_sends_no_epoch_twice_and_loses_none(
        db, celery_client, digits_dataset, worker_artifacts, mlflow_server, mlflow_client, after,
        enabled):
    job = train(db, celery_client, digits_dataset, epochs=3, seed=11 if after else 12)
    assert wait_job(db, job.id).status == "succeeded"
    flaky = LosesAnswers(mlflow_client, after)
    report = one_pass(db, worker_artifacts, mlflow_server, client=flaky)
    assert report.stopped and "answer was lost" in report.stopped
    record = run_of(db, mlflow_server, job.model_id)
    assert record.sending_through == 3 and record.epochs_logged == 0
    assert not job_sync_state(db, job.id)["in_sync"]
    counting = Counting(mlflow_client)
    report = one_pass(db, worker_artifacts, mlflow_server, client=counting)
    assert report.stopped is None, report
    # the server is asked what it holds first: a batch it stored is not sent again (the
    # SQL store would drop identical points, other stores need not), a lost one is
    assert counting.epochs_sent == ([] if after else [1, 2, 3])
    assert_history_is_latentbanks(mlflow_client, run_of(db, mlflow_server, job.model_id).run_id,
                                  recorded(db, job.model_id))


def test_a_dead_mlflow_server_costs_a_job_nothing_and_its_run_catches_up(
        db, digits_dataset, mlflow_stack, mlflow_server, mlflow_client, trained):
    """The deployed path: the job runs on a worker whose beat sends the bridge's passes
    against a server that is down; the job succeeds, the passes fail and say so on the
    job, and once the server is back the run catches up by itself."""
    mlflow_server.stop()
    try:
        job = train(db, mlflow_stack["sender"], digits_dataset, epochs=3, seed=21)
        assert wait_job(db, job.id).status == "succeeded"
        state = wait("a failed pass to note the outage on the job",
                     lambda: (s := job_sync_state(db, job.id)) and s["error"] and s,
                     timeout=60, every=0.2)
        assert not state["in_sync"] and state["run_id"] is None, state
    finally:
        mlflow_server.start()
    state = wait("the run to catch up",
                 lambda: (s := job_sync_state(db, job.id))["in_sync"] and s, timeout=120,
                 every=0.25)
    assert state["registered_version"] and state["error"] is None, state
    assert_history_is_latentbanks(mlflow_client, state["run_id"], recorded(db, job.model_id))


def test_a_sweep_is_a_parent_run_with_a_child_per_job(
        db, celery_client, digits_dataset, worker_artifacts, mlflow_server, mlflow_client, enabled,
        trained):
    sweep_id, jobs = submit_grid(db, digits_dataset, MODEL, {**TRAINING, "epochs": 1},
                                 {"model.latent_dim": [2, 3]})
    for job in jobs:
        publish(db, celery_client, job)
    for job in jobs:
        assert wait_job(db, job.id).status == "succeeded"
    one_pass(db, worker_artifacts, mlflow_server)
    with db.engine.connect() as conn:
        parent = conn.execute(text("SELECT run_id, run_status FROM mlflow_sweeps WHERE "
                                   "sweep_id = :s"), {"s": sweep_id}).first()
    assert parent.run_status == "FINISHED"
    children = mlflow_client.search_runs(
        [mlflow_client.get_run(parent.run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    assert sorted(r.data.params["model.latent_dim"] for r in children) == ["2", "3"]
    assert {r.data.tags["latentbank.sweep_id"] for r in children} == {sweep_id}


def test_epoch_metrics_unit():
    rows = [{"epoch": 1, "split": "train", "elbo": -5.0, "kl": 1.0, "seconds": 2.0,
             "lr": 0.1, "beta": 1.0, "log_px": None},
            {"epoch": 1, "split": "val", "elbo": -6.0, "log_px": -5.5},
            {"epoch": 2, "split": "train", "elbo": -4.0, "seconds": 3.0, "lr": 0.1,
             "beta": 1.0}]
    got = epoch_metrics(rows, 1000)
    assert (1, "train/elbo", -5.0, 3000) in got and (1, "val/log_px", -5.5, 3000) in got
    assert (2, "train/elbo", -4.0, 6000) in got and (2, "epoch_seconds", 3.0, 6000) in got
    assert not [m for m in got if m[1] == "train/log_px"]  # missing values are left out


@pytest.fixture(scope="module")
def mlflow_stack(worker_env, worker_logs, mlflow_server, tmp_path_factory):
    """A worker and a beat configured with the bridge, as a deployment runs them, on a
    broker of their own (the other tests' worker never sees this stack's tasks)."""
    from celery import Celery

    from tests.conftest import _redis

    redis = _redis(14, tmp_path_factory)
    url = next(redis)
    env = {**worker_env, "LATENTBANK_REDIS_URL": url,
           "LATENTBANK_MLFLOW_TRACKING_URI": mlflow_server.uri,
           "LATENTBANK_MLFLOW_EXPERIMENT": EXPERIMENT,
           "LATENTBANK_MLFLOW_SYNC_INTERVAL": "0.5", "LATENTBANK_MLFLOW_TIMEOUT_SECONDS": "5"}
    # two pool processes: one trains while the other runs the bridge's passes (as in
    # compose, where the embedding workers run the maintenance queue)
    worker = Worker(env, worker_logs, "mlflow-worker", concurrency=2)
    beat = Beat(env, worker_logs, "mlflow-beat")
    sender = Celery("mlflow-stack-client", broker=url)
    sender.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    yield {"env": env, "worker": worker, "url": url, "sender": sender}
    beat.stop()
    worker.stop()
    next(redis, None)


def test_beat_keeps_the_run_in_step_through_a_pool_child_killed_mid_training(
        db, digits_dataset, mlflow_stack, mlflow_server, mlflow_client, enabled, trained):
    """The deployed path: beat sends the bridge's passes to a worker; a training job's
    pool child is killed after some epochs reached MLflow; the job resumes from its
    checkpoint and the run holds every epoch exactly once."""
    sender = mlflow_stack["sender"]
    job, _ = submit_train(db, digits_dataset, MODEL,
                          {**TRAINING, "epochs": 100, "seed": 31, "importance_samples": 100})
    publish(db, sender, job)

    def logged_some():
        state = job_sync_state(db, job.id)
        return state and state["epochs_logged"] >= 3 and state

    wait("epochs in MLflow while the job trains", logged_some, timeout=180, every=0.2)
    running = get_job(db, job.id)
    assert running.status == "running" and running.items_done < 90, "the job ended too soon"
    worker = mlflow_stack["worker"]
    for pid in worker.pool_children():
        os.kill(pid, signal.SIGKILL)
    final = wait_job(db, job.id, timeout=400)
    assert final.status == "succeeded" and final.attempts >= 2, final
    state = wait("the run to catch up",
                 lambda: (s := job_sync_state(db, job.id))["in_sync"] and s, timeout=120,
                 every=0.25)
    assert state["run_status"] == "FINISHED" and state["registered_version"]
    assert_history_is_latentbanks(mlflow_client, state["run_id"], recorded(db, job.model_id))


def test_the_job_api_says_whether_its_run_is_in_sync(db, trained, worker_settings):
    from service.api.app import create_app
    from store.keys import create_key

    api = Served(create_app(worker_settings))
    try:
        key = create_key(db, "mlflow-api", ["read"]).key
        r = httpx.get(f"{api.url}/v1/jobs/{trained.id}", timeout=30,
                      headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        assert r.json()["mlflow"]["in_sync"] is True
        assert r.json()["mlflow"]["epochs_logged"] == 4
    finally:
        api.stop()



def test_mlflow_sync_back_fills_models_trained_before_the_bridge(
        db, trained, mlflow_server, mlflow_client, worker_env):
    """`latentbank mlflow sync --model ID`, run as an operator runs it (a process with the
    database and artifact settings), pushes a model this server was never told of: here
    the same server under another name, so nothing tracked it yet."""
    import sys

    other = mlflow_server.uri.replace("127.0.0.1", "localhost")
    env = {**worker_env, "LATENTBANK_MLFLOW_TRACKING_URI": other,
           "LATENTBANK_MLFLOW_EXPERIMENT": "latentbank-backfill"}
    missing = subprocess.run([sys.executable, "-m", "service.cli", "mlflow", "sync",
                              "--model", "987654321"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "model 987654321 does not exist" in missing.stderr
    done = subprocess.run([sys.executable, "-m", "service.cli", "mlflow", "sync", "--model",
                           str(trained.model_id)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 model(s) newly tracked" in done.stderr and "1 of 1 run(s) up to date" in done.stdout
    experiment = mlflow_client.get_experiment_by_name("latentbank-backfill")
    runs = mlflow_client.search_runs([experiment.experiment_id])
    assert [r.data.tags["latentbank.model_id"] for r in runs] == [str(trained.model_id)]
    assert runs[0].info.status == "FINISHED"
    assert_history_is_latentbanks(mlflow_client, runs[0].info.run_id,
                                  recorded(db, trained.model_id))
    again = subprocess.run([sys.executable, "-m", "service.cli", "mlflow", "sync", "--model",
                            str(trained.model_id)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "0 model(s) newly tracked" in again.stderr
    assert len(mlflow_client.search_runs([experiment.experiment_id])) == 1  # no second run


def test_a_model_deleted_before_it_was_ready_ends_its_run_and_leaves_nothing_behind(
        db, digits_dataset, worker_artifacts, mlflow_server, mlflow_client, enabled):
    from store.jobs import request_cancel
    from store.mlflow_sync import count_behind

    job, _ = submit_train(db, digits_dataset, MODEL, TRAINING)  # never sent: stays queued
    one_pass(db, worker_artifacts, mlflow_server)
    record = run_of(db, mlflow_server, job.model_id)
    assert mlflow_client.get_run(record.run_id).info.status == "RUNNING"
    request_cancel(db, job.id)
    report = one_pass(db, worker_artifacts, mlflow_server)
    assert mlflow_client.get_run(record.run_id).info.status == "KILLED", report
    delete_model(db, worker_artifacts, job.model_id)
    report = one_pass(db, worker_artifacts, mlflow_server)
    assert report.stopped is None and not report.errors, report
    record = run_of(db, mlflow_server, job.model_id)
    assert record.run_status == "KILLED" and record.registered_version is None
    assert count_behind(db, mlflow_server.uri) == 0  # nothing lags for ever
    assert job_sync_state(db, job.id)["in_sync"]


def test_registered_names_are_ones_mlflow_takes():
    from pydantic import ValidationError

    from bridges.mlflow_registry import registered_name
    from service.api.schemas.jobs import TrainingRequest
    from store.mlflow_sync import RunWork

    def name(dataset_name, params=None):
        return registered_name(RunWork(1, {}, {"params": params or {}}, {},
                                       {"name": dataset_name}))

    assert name("digits") == "digits"
    assert name("team/digits:v2") == "team-digits-v2"
    assert name("../x") == "x" and name("") == "latentbank" and name("a'b\\") == "a-b"
    assert name("digits", {"registered_model": "faces v2"}) == "faces v2"
    for bad in ("a/b", "a:b", "..x", "x..y", " x", "", "é"):
        with pytest.raises(ValidationError):
            TrainingRequest(dataset_id=1, model={}, registered_model=bad)
    assert TrainingRequest(dataset_id=1, model={}, registered_model="Faces_v2.1-a b")
