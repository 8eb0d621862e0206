"""The job state machine on real PostgreSQL: claims, leases, takeover of dead owners,
fencing, releases, cancellation races, the attempt cap, and the model/set rows that follow
their job in the same transaction."""

import threading
import time

import numpy as np
import pytest
from sqlalchemy import text

from store.embedding_sets import get_set
from store.errors import Conflict
from store.jobs import (
    LeaseLost,
    claim,
    count_done,
    count_jobs,
    finish,
    get_job,
    heartbeat,
    list_jobs,
    record_epochs,
    release,
    request_cancel,
)
from store.publishing import publish
from store.recovery import requeue_lost, unpublished_jobs
from store.registry import get_model
from store.submit import submit_embedding
from tests.store.sets import count_latents, write_latents
from tests.support import submit_train

MODEL = {"latent_dim": 2, "hidden": [8]}
TRAINING = {"epochs": 1}


@pytest.fixture(scope="module")
def dataset(db, tmp_path_factory):
    from ingest.arrays import register_file
    from store.artifacts import ArtifactStore
    from store.settings import Settings

    tmp = tmp_path_factory.mktemp("jobs")
    np.save(tmp / "x.npy", np.random.default_rng(3).random((30, 4), dtype=np.float32))
    return register_file(db, ArtifactStore((tmp / "a").as_uri()),
                         Settings(data_dir=tmp / "d"), "jobs-state", str(tmp / "x.npy")
                            ).dataset


@pytest.fixture
def job(db, dataset):
    return submit_train(db, dataset, MODEL, TRAINING, max_attempts=3)[0]


def set_columns(db, job_id, **values):
    sets = ", ".join(f"{k} = {v}" for k, v in values.items())
    with db.engine.begin() as conn:
        conn.execute(text(f"UPDATE jobs SET {sets} WHERE id = :j"), {"j": job_id})


def test_concurrent_deliveries_claim_once(db, job):
    outcomes, barrier = [], threading.Barrier(8)

    def deliver(i):
        barrier.wait()
        outcomes.append(claim(db, job.id, f"owner-{i}", 30).outcome)

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["busy"] * 7 + ["claimed"]
    row = get_job(db, job.id)
    assert (row.status, row.attempts) == ("running", 1)
    assert get_model(db, row.model_id).status == "training"  # in the claim's transaction


def test_a_dead_owner_is_taken_over_at_once_and_fenced_out(db, job):
    assert claim(db, job.id, "old", 60).outcome == "claimed"
    assert claim(db, job.id, "new", 60, owner_is_dead=lambda o: False).outcome == "busy"
    asked = []
    got = claim(db, job.id, "new", 60, owner_is_dead=lambda o: asked.append(o) or True)
    assert (got.outcome, got.took_over, asked) == ("claimed", "old", ["old"])
    assert get_job(db, job.id).attempts == 2
    # The old attempt can write nothing any more.
    with pytest.raises(LeaseLost):
        heartbeat(db, job.id, "old", 60)
    rows = [{"epoch": 1, "split": "train", "elbo": -1.0, "reconstruction": -0.5, "kl": 0.5,
             "importance_samples": 0, "beta": 1.0, "lr": 0.1, "seconds": 1.0}]
    with pytest.raises(LeaseLost):
        record_epochs(db, job.id, "old", job.model_id, rows, "file:///x/old.safetensors")
    with pytest.raises(LeaseLost):
        finish(db, job.id, "old", "succeeded", model={"summary": {"stale": True}})
    model = get_model(db, job.model_id)
    assert model.checkpoint_uri is None and model.summary is None
    # The new one can.
    record_epochs(db, job.id, "new", job.model_id, rows, "file:///x/new.safetensors")
    assert get_model(db, job.model_id).checkpoint_uri == "file:///x/new.safetensors"
    finish(db, job.id, "new", "succeeded", model={"summary": {"heldout_elbo": -1.0}})
    model, row = get_model(db, job.model_id), get_job(db, job.id)
    assert (row.status, row.progress, model.status, model.summary) == (
        "succeeded", 1.0, "ready", {"heldout_elbo": -1.0})


def test_expired_leases_are_requeued_and_attempts_stay_counted(db, job):
    claim(db, job.id, "gone", 60)
    assert job.id not in requeue_lost(db)  # the lease is live
    set_columns(db, job.id, lease_expires_at="now() - interval '1 second'")
    assert job.id in requeue_lost(db)
    row = get_job(db, job.id)
    assert (row.status, row.attempts, row.lease_owner, row.published_at) == (
        "queued", 1, None, None)
    assert "stopped answering" in row.progress_message
    assert claim(db, job.id, "next", 60).outcome == "claimed"
    assert get_job(db, job.id).attempts == 2


def test_a_dead_owner_is_requeued_only_once_its_heartbeats_stop(db, job):
    claim(db, job.id, "dead-owner", 600)
    # A heartbeat just came (say from a shard of the same attempt): not yet.
    assert job.id not in requeue_lost(db, lambda o: True, silent_seconds=5)
    set_columns(db, job.id, heartbeat_at="now() - interval '6 seconds'")
    assert job.id not in requeue_lost(db, lambda o: False, silent_seconds=5)  # alive
    assert job.id in requeue_lost(db, lambda o: o == "dead-owner", silent_seconds=5)
    assert get_job(db, job.id).status == "queued"


def test_the_attempt_cap_fails_the_job_and_its_model(db, dataset):
    job = submit_train(db, dataset, MODEL, TRAINING, max_attempts=2)[0]
    for owner in ("a", "b"):
        assert claim(db, job.id, owner, 60).outcome == "claimed"
        set_columns(db, job.id, lease_expires_at="now() - interval '1 second'")
        requeue_lost(db)
    got = claim(db, job.id, "c", 60)
    assert got.outcome == "exhausted"
    row = get_job(db, job.id)
    assert (row.status, row.attempts) == ("failed", 2) and "gave up after 2" in row.error
    assert get_model(db, job.model_id).status == "failed"
    assert claim(db, job.id, "d", 60).outcome == "terminal"


def test_cancel_races(db, job):
    # queued: cancelled at once, with its model; a late delivery never starts it
    request_cancel(db, job.id)
    assert get_job(db, job.id).status == "cancelled"
    assert get_model(db, job.model_id).status == "cancelled"
    assert claim(db, job.id, "late", 60).outcome == "terminal"
    with pytest.raises(Conflict):
        request_cancel(db, job.id)


def test_cancel_of_a_running_job_reaches_its_heartbeat(db, dataset):
    job = submit_train(db, dataset, MODEL, TRAINING)[0]
    claim(db, job.id, "runner", 60)
    assert heartbeat(db, job.id, "runner", 60, progress=0.5, message="half") is False
    request_cancel(db, job.id)
    assert get_job(db, job.id).status == "running"  # stops at its next check
    assert heartbeat(db, job.id, "runner", 60) is True
    finish(db, job.id, "runner", "cancelled")
    assert get_model(db, job.model_id).status == "cancelled"


def test_release_requeues_without_ending_the_job(db, job):
    claim(db, job.id, "unlucky", 60)
    assert release(db, job.id, "unlucky", "the database went away")
    row = get_job(db, job.id)
    assert (row.status, row.attempts, row.published_at, row.error) == ("queued", 1, None, None)
    assert row.progress_message == "requeued: the database went away"
    assert not release(db, job.id, "unlucky", "again")  # no longer its to release
    set_columns(db, job.id, created_at="now() - interval '1 minute'")
    assert job.id in [j.id for j in unpublished_jobs(db)]


def _ready_model(db, dataset):
    job = submit_train(db, dataset, MODEL, TRAINING)[0]
    claim(db, job.id, "trainer", 60)
    finish(db, job.id, "trainer", "succeeded")
    return job.model_id


@pytest.mark.parametrize("ending", ["failed", "cancelled"])
def test_a_failed_or_cancelled_embedding_keeps_no_partial_rows(db, dataset, ending):
    model_id = _ready_model(db, dataset)
    job = submit_embedding(db, model_id, dataset.id)[0]
    claim(db, job.id, "embedder", 60)
    es = get_set(db, job.embedding_set_id)
    assert es.status == "writing"
    rng = np.random.default_rng(0)
    half = dataset.n_items // 2
    write_latents(db, es.id, 0, rng.standard_normal((half, 2)), rng.standard_normal((half, 2)),
                  -np.ones(half), -np.ones(half), np.zeros(half))
    assert count_latents(db, es.id) == half
    finish(db, job.id, "embedder", ending, error="boom" if ending == "failed" else None)
    assert count_latents(db, es.id) == 0
    assert get_set(db, es.id).status == ending


def test_unpublished_jobs_leave_fresh_submissions_to_their_submitter(db, dataset):
    job = submit_train(db, dataset, MODEL, TRAINING)[0]
    assert job.id not in [j.id for j in unpublished_jobs(db, grace_seconds=60)]
    time.sleep(0.2)
    assert job.id in [j.id for j in unpublished_jobs(db, grace_seconds=0.1)]


def test_a_sent_job_that_never_started_is_sent_again_with_a_growing_wait(db, dataset):
    job = submit_train(db, dataset, MODEL, TRAINING)[0]
    set_columns(db, job.id, created_at="now() - interval '100 seconds'",
                published_at="now() - interval '40 seconds'")
    ids = lambda r: [j.id for j in unpublished_jobs(db, republish_seconds=r)]  # noqa: E731
    assert job.id not in ids(None)  # sent, and no republishing asked for
    assert job.id not in ids(30)  # 40 s ago, but the job is 100 s old: wait 50 s
    set_columns(db, job.id, published_at="now() - interval '51 seconds'")
    assert job.id in ids(30)
    claim(db, job.id, "runner", 60)
    assert job.id not in ids(0)  # started: never again


def test_one_maintenance_pass_at_a_time(db):
    from store.recovery import maintenance_lock

    with maintenance_lock(db) as first, maintenance_lock(db) as second:
        assert (first, second) == (True, False)
    with maintenance_lock(db) as again:
        assert again  # released


class FakeSender:
    """Stands in for the broker in units of `publish` (the workers' tests use a real one)."""

    def __init__(self, fail=False):
        self.sent, self.fail = [], fail

    def send_task(self, name, args=(), **options):
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((name, list(args), options["queue"]))


def test_publish_sends_once_and_records_it_only_when_the_broker_took_it(db, job):
    down = FakeSender(fail=True)
    assert publish(db, down, job) is False
    assert get_job(db, job.id).published_at is None  # a later maintenance pass sends it
    up = FakeSender()
    assert publish(db, up, job) is True
    assert up.sent == [("latentbank.train", [job.id], "train")]
    assert get_job(db, job.id).published_at is not None


def test_embedding_progress_is_counted_in_columns_under_the_lease(db, dataset):
    model_id = _ready_model(db, dataset)
    job = submit_embedding(db, model_id, dataset.id)[0]
    assert claim(db, job.id, "embedder", 60).outcome == "claimed"
    row = get_job(db, job.id)
    assert (row.items_done, row.items_total) == (0, dataset.n_items)
    threads = [threading.Thread(target=count_done, args=(db, job.id, "embedder", 3))
               for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert count_done(db, job.id, "embedder", 0) == (15, dataset.n_items)  # 5 x 3, no loss
    assert "done_rows" not in get_job(db, job.id).params
    with pytest.raises(LeaseLost):
        count_done(db, job.id, "someone-else", 1)
    set_columns(db, job.id, lease_expires_at="now() - interval '1 second'")
    requeue_lost(db)
    assert claim(db, job.id, "second", 60).outcome == "claimed"
    assert get_job(db, job.id).items_done == 0  # a new attempt counts again


def test_recorded_epochs_count_as_done_and_a_stale_attempt_records_nothing(db, job):
    claim(db, job.id, "trainer", 60)
    assert get_job(db, job.id).items_total == TRAINING["epochs"]
    row = {"elbo": -1.0, "reconstruction": -0.5, "kl": 0.5, "importance_samples": 0,
           "beta": 1.0, "lr": 1e-3, "seconds": 0.1}
    record_epochs(db, job.id, "trainer", job.model_id, [dict(row, epoch=1, split="train")])
    assert get_job(db, job.id).items_done == 1
    with pytest.raises(LeaseLost):
        record_epochs(db, job.id, "stale", job.model_id, [dict(row, epoch=7, split="train")],
                      "file:///elsewhere/checkpoint.safetensors")
    assert get_job(db, job.id).items_done == 1
    assert get_model(db, job.model_id).checkpoint_uri is None


def test_a_succeeded_job_and_its_model_end_in_one_transaction(db, job):
    claim(db, job.id, "trainer", 60)
    finish(db, job.id, "trainer", "succeeded", model={"summary": {"heldout_elbo": -3.0}})
    row, model = get_job(db, job.id), get_model(db, job.model_id)
    assert (row.status, row.progress, model.status) == ("succeeded", 1.0, "ready")
    assert model.summary == {"heldout_elbo": -3.0}
    with pytest.raises(LeaseLost):  # ended: nobody finishes it again
        finish(db, job.id, "trainer", "failed", error="late")
    assert get_model(db, job.model_id).status == "ready"


def test_list_and_count_jobs_agree_with_a_direct_count(db, dataset):
    submit_train(db, dataset, MODEL, TRAINING)
    with db.engine.connect() as conn:
        want = {(k, s): n for k, s, n in conn.execute(text(
            "SELECT kind, status, count(*) FROM jobs GROUP BY 1, 2"))}
        queued_train = [r[0] for r in conn.execute(text(
            "SELECT id FROM jobs WHERE kind = 'train' AND status = 'queued' "
            "ORDER BY id DESC LIMIT 5"))]
    assert {(k, s): n for k, s, n in count_jobs(db)} == want
    listed = list_jobs(db, status="queued", kind="train", limit=5)
    assert [j.id for j in listed] == queued_train
