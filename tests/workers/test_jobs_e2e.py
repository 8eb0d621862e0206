"""Jobs end to end: real worker processes, real Redis, real PostgreSQL, real artifacts."""

import re
import time

import numpy as np
import onnxruntime as ort
import pytest
from sqlalchemy import text

from models.config import TrainConfig, VAEConfig
from models.data import load_digits_dataset
from models.trainer import Trainer
from store.embedding_sets import get_set
from store.jobs import get_job, request_cancel
from store.publishing import publish
from store.retrieval import export_pages
from store.search import search
from store.settings import Settings
from store.submit import leaderboard, submit_embedding
from store.tables import Model
from tests.support import submit_grid, submit_train

MODEL = {"family": "mlp", "latent_dim": 6, "hidden": [64, 32], "likelihood": "bernoulli"}
TRAINING = {"epochs": 6, "batch_size": 64, "lr": 0.002, "seed": 5, "importance_samples": 50,
            "eval_importance_samples": 8}


def wait_for(db, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get_job(db, job_id)
        if job.status in statuses:
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} still {get_job(db, job_id).status} after {timeout}s")


def wait_indexed(db, set_id, timeout=120):
    """The set once its index task has reported (its stats carry `index`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        es = get_set(db, set_id)
        if "index" in (es.stats or {}):
            return es
        time.sleep(0.2)
    raise AssertionError(f"set {set_id} still indexing after {timeout}s")


def metric_rows(db, model_id):
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            "SELECT epoch, split, elbo, reconstruction, kl, log_px, beta, loss "
            "FROM training_metrics WHERE model_id = :m ORDER BY epoch, split"), {"m": model_id})]


def get_model(db, model_id):
    with db.session() as s:
        return s.get(Model, model_id)


@pytest.fixture(scope="module")
def worker(start_worker):
    w = start_worker("main")
    yield w
    w.stop()


@pytest.fixture(scope="module")
def trained(db, worker, celery_client, digits_dataset):
    job, created = submit_train(db, digits_dataset, MODEL, TRAINING,
                                   idempotency_key="e2e-train")
    assert created
    publish(db, celery_client, job)
    return wait_for(db, job.id)


def test_training_job_end_to_end(db, trained, worker_artifacts, digits_dataset):
    job = trained
    assert job.status == "succeeded", job.error
    assert (job.attempts, job.progress, job.error) == (1, 1.0, None)
    assert job.started_at <= job.finished_at
    model = get_model(db, job.model_id)
    assert model.status == "ready"
    rows = metric_rows(db, model.id)
    assert [(r["epoch"], r["split"]) for r in rows] == [
        (e, s) for e in range(1, 7) for s in ("train", "val")]
    # The job system reproduces the trainer run directly on the same data and configs.
    images, _ = load_digits_dataset()
    direct = Trainer(VAEConfig.from_dict({**MODEL, "input_shape": [1, 8, 8]}),
                     TrainConfig.from_dict(TRAINING)).fit(images).history
    for got, want in zip(rows, direct, strict=True):
        for key in ("elbo", "reconstruction", "kl", "log_px"):
            if want[key] is None:
                assert got[key] is None
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (key, got)
    s = model.summary
    assert s["heldout_importance_samples"] == 50 and s["heldout_log_px"] >= s["heldout_elbo"]
    for role in ("encoder", "decoder"):  # the artifacts are the files whose hashes we keep
        key = worker_artifacts.key_of(getattr(model, f"{role}_uri"))
        assert key == f"models/{model.id}/attempt-1/{role}.onnx"
        assert worker_artifacts.sha256(key) == getattr(model, f"{role}_sha256")
    # Same idempotency key: the first job, nothing new.
    again, created = submit_train(db, digits_dataset, MODEL, TRAINING,
                                     idempotency_key="e2e-train")
    assert not created and again.id == job.id


def test_embedding_job_end_to_end_and_twice(db, trained, celery_client, digits_dataset,
                                            worker_artifacts, tmp_path):
    model_id = trained.model_id
    job, _ = submit_embedding(db, model_id, digits_dataset.id, importance_samples=20)
    publish(db, celery_client, job)
    job = wait_for(db, job.id)
    assert job.status == "succeeded", job.error
    es = get_set(db, job.embedding_set_id)
    assert es.status == "ready" and es.stats["n_items"] == 1797 and es.stats["shards"] == 5
    assert "searchable now" in job.progress_message
    # searchable at once (exact), whatever the index is doing
    hit = search(db, Settings(), es.id, key="0", k=3, include_query=True).hits[0]
    assert hit.key == "0" and hit.distance == 0
    es = wait_indexed(db, es.id)  # the follow-up task: index, then kNN statistics
    assert es.index_status in ("ready", "skipped") and es.stats["index"]["status"] == (
        es.index_status)
    assert es.stats["knn_label_accuracy"] > 0.6  # chance is 0.1
    assert es.stats["mean_log_px"] >= es.stats["mean_elbo"]
    rows = [r for page in export_pages(db, es.id) for r in page]
    assert [r["index"] for r in rows] == list(range(1797))
    # Stored codes equal onnxruntime run directly on the model's encoder file.
    worker_artifacts.get_file(worker_artifacts.key_of(get_model(db, model_id).encoder_uri),
                              str(tmp_path / "e.onnx"))
    images, labels = load_digits_dataset()
    mu, logvar = ort.InferenceSession(str(tmp_path / "e.onnx")).run(None, {"x": images[:50]})
    np.testing.assert_allclose([r["mu"] for r in rows[:50]], mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([r["logvar"] for r in rows[:50]], logvar, rtol=1e-6, atol=1e-6)
    for r in rows[:50]:
        assert r["elbo"] == pytest.approx(r["reconstruction"] - r["kl"], abs=1e-6)
        assert r["label"] == str(labels[r["index"]])
    # A redelivered task of the finished job changes nothing; a second job stores the same.
    celery_client.send_task("latentbank.embed", args=[job.id], queue="embed")
    second, _ = submit_embedding(db, model_id, digits_dataset.id, importance_samples=20)
    publish(db, celery_client, second)
    second = wait_for(db, second.id)
    assert second.status == "succeeded"
    again = [r for page in export_pages(db, second.embedding_set_id) for r in page]
    assert len(again) == len(rows) == 1797
    np.testing.assert_array_equal([r["mu"] for r in again], [r["mu"] for r in rows])
    assert get_job(db, job.id).attempts == 1


def test_bad_dataset_fails_with_a_clear_message(db, worker, celery_client, worker_artifacts,
                                                worker_settings, tmp_path):
    from ingest.arrays import register_file

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((100, 4)) * 5)
    ds = register_file(db, worker_artifacts, worker_settings, "not-in-unit-interval",
                       str(tmp_path / "x.npy")).dataset
    job, _ = submit_train(db, ds, {"latent_dim": 2, "hidden": [8]}, {"epochs": 1})
    publish(db, celery_client, job)
    job = wait_for(db, job.id)
    assert job.status == "failed" and job.attempts == 1
    assert "bernoulli likelihood needs values in [0, 1]" in job.error
    assert get_model(db, job.model_id).status == "failed"


def test_cancel_queued_and_running(db, worker, celery_client, digits_dataset,
                                   worker_artifacts):
    queued, _ = submit_train(db, digits_dataset, MODEL, TRAINING)
    assert request_cancel(db, queued.id).status == "cancelled"
    publish(db, celery_client, queued)  # delivered anyway: it never starts
    time.sleep(2)
    job = get_job(db, queued.id)
    assert (job.status, job.attempts) == ("cancelled", 0)
    assert get_model(db, job.model_id).status == "cancelled"

    long = dict(TRAINING, epochs=500)
    running, _ = submit_train(db, digits_dataset, MODEL, long)
    publish(db, celery_client, running)
    deadline = time.monotonic() + 60
    while len(metric_rows(db, running.model_id)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    asked = time.monotonic()
    request_cancel(db, running.id)
    job = wait_for(db, running.id, timeout=30)
    assert job.status == "cancelled" and time.monotonic() - asked < 10
    assert get_model(db, job.model_id).status == "cancelled"
    assert worker_artifacts.exists(
        worker_artifacts.key_of(get_model(db, job.model_id).checkpoint_uri))
    assert len(metric_rows(db, job.model_id)) < 2 * 500


def test_sweep_leaderboard(db, worker, celery_client, digits_dataset):
    sweep_id, jobs = submit_grid(db, digits_dataset, MODEL, dict(TRAINING, epochs=2),
                                  {"model.latent_dim": [2, 6], "model.beta": [1.0, 4.0]})
    assert len(jobs) == 4
    for job in jobs:
        publish(db, celery_client, job)
    for job in jobs:
        assert wait_for(db, job.id).status == "succeeded"
    board = leaderboard(db, sweep_id)
    scores = [row["heldout_log_px"] for row in board]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in board] == [1, 2, 3, 4]
    assert {(r["latent_dim"], r["beta"]) for r in board} == {(2, 1.0), (2, 4.0), (6, 1.0),
                                                            (6, 4.0)}


def test_kill_9_mid_training_resumes_from_checkpoint(db, start_worker, worker, celery_client,
                                                     digits_dataset):
    training = dict(TRAINING, epochs=30)
    reference, _ = submit_train(db, digits_dataset, MODEL, training)
    publish(db, celery_client, reference)
    reference = wait_for(db, reference.id)
    assert reference.status == "succeeded"

    victim = start_worker("victim", alone=True)  # only the victim takes the next job
    job, _ = submit_train(db, digits_dataset, MODEL, training)
    publish(db, celery_client, job)
    deadline = time.monotonic() + 60
    while len(metric_rows(db, job.model_id)) < 6:  # three epochs done
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim.kill()
    assert get_job(db, job.id).status == "running"
    rescuer = start_worker("rescuer")  # requeues the job once its lease expires, resumes it
    job = wait_for(db, job.id)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    resumed = re.search(rf"resuming job_id={job.id} from epoch (\d+)", rescuer.log.read_text())
    assert resumed and int(resumed.group(1)) >= 3  # from the checkpoint, not from scratch
    rows, want = metric_rows(db, job.model_id), metric_rows(db, reference.model_id)
    assert len(rows) == len({(r["epoch"], r["split"]) for r in rows}) == 60
    assert rows == want  # bit for bit the uninterrupted run's metrics
    got, ref = get_model(db, job.model_id).summary, get_model(db, reference.model_id).summary
    for key in ("heldout_elbo", "heldout_log_px", "heldout_kl"):
        assert got[key] == ref[key]


def test_a_job_that_keeps_killing_its_worker_ends_failed(db, start_worker, celery_client,
                                                         digits_dataset):
    job, _ = submit_train(db, digits_dataset, MODEL, dict(TRAINING, epochs=400),
                             max_attempts=1)
    victim = start_worker("crasher", alone=True)
    publish(db, celery_client, job)
    deadline = time.monotonic() + 60
    while not metric_rows(db, job.model_id):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim.kill()
    start_worker("after-crash")
    job = wait_for(db, job.id)
    assert job.status == "failed" and job.attempts == 1
    assert "gave up after 1 attempt" in job.error


def test_two_workers_share_one_embedding_job(db, start_worker, trained, celery_client,
                                             digits_dataset):
    start_worker("second")
    job, _ = submit_embedding(db, trained.model_id, digits_dataset.id)
    publish(db, celery_client, job)
    job = wait_for(db, job.id)
    assert job.status == "succeeded", job.error
    es = get_set(db, job.embedding_set_id)
    assert sum(es.stats["workers"].values()) == 5
    assert len(es.stats["workers"]) >= 2, es.stats["workers"]


def test_unpublished_job_is_published_by_maintenance(db, start_worker, celery_client,
                                                     digits_dataset):
    """A broker outage at submission: the row exists but the task was never sent."""
    job, _ = submit_train(db, digits_dataset, MODEL, dict(TRAINING, epochs=1))
    with db.engine.begin() as conn:  # make it look older than the submitter's grace period
        conn.execute(text("UPDATE jobs SET created_at = now() - interval '1 minute' "
                          "WHERE id = :j"), {"j": job.id})
    assert wait_for(db, job.id, timeout=60).status == "succeeded"


