"""States the review found that nothing repaired, forced with real concurrent transactions
on real PostgreSQL: a dataset deleted while a submission references it, and a stale
finisher marking a set that a newer attempt is writing, and late index statistics.

Each interleaving is forced, not hoped for: a transaction of the test holds a lock that
one side must wait on, and the test waits until PostgreSQL reports the expected number
of sessions waiting on a lock before it lets them go."""

import os
import threading
import time
import uuid

import numpy as np
import pytest
from sqlalchemy import func, select, text

from store.datasets import delete_dataset, get_dataset
from store.embedding_sets import get_set
from store.errors import Conflict, NotFound
from store.jobs import LeaseLost, claim, get_job, mark_finishing
from store.submit import submit_embedding, submit_training
from store.tables import EmbeddingSet, Job, Model

CONFIG = {"model": {"family": "mlp", "input_shape": [4], "latent_dim": 2},
          "training": {"epochs": 1}}


@pytest.fixture
def artifacts(tmp_path):
    from store.artifacts import ArtifactStore

    return ArtifactStore((tmp_path / "a").as_uri())


@pytest.fixture
def new_dataset(db, tmp_path, artifacts):
    """A factory of datasets of their own content (datasets are deduplicated by it)."""
    from ingest.arrays import register_file
    from store.settings import Settings

    def make(n=12):
        path = tmp_path / f"{uuid.uuid4().hex}.npy"
        np.save(path, np.random.default_rng().random((n, 4), dtype=np.float32))
        return register_file(db, artifacts, Settings(data_dir=tmp_path / "d"),
                             f"stuck-{uuid.uuid4().hex[:10]}", str(path)).dataset

    return make


@pytest.fixture
def ready_model(db, new_dataset):
    """A ready model row (no files: nothing here runs it) trained on a dataset of its own."""
    home = new_dataset()
    with db.session() as s:
        row = Model(dataset_id=home.id, status="ready", config=CONFIG)
        s.add(row)
        s.flush()
        return row.id


def lock_waiters(db):
    with db.engine.connect() as conn:
        return conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")).scalar_one()


def wait_for_waiters(db, n, timeout=20):
    deadline = time.monotonic() + timeout
    while lock_waiters(db) < n:
        assert time.monotonic() < deadline, f"{n} session(s) never waited on a lock"
        time.sleep(0.02)


class Run(threading.Thread):
    """A call in a thread of its own (its own session and connection): its result or error."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def outcome(self, timeout=30):
        self.join(timeout)
        assert not self.is_alive(), f"{self.fn.__name__} never returned"
        return self.error if self.error is not None else self.result


def models_of(db, dataset_id):
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Model)
                        .where(Model.dataset_id == dataset_id))


# -- a dataset deleted while a submission references it ---------------------------------

def test_a_submission_during_a_dataset_delete_is_not_found_not_a_foreign_key_error(
        db, new_dataset, artifacts):
    """The delete goes first and is held mid-way (its cascade waits on an item row the
    test locks); a training submission arrives meanwhile. It must wait for the delete and
    answer NotFound (404), not a foreign-key violation (a 500 in the API)."""
    dataset = new_dataset()
    holder = db.engine.connect()
    tx = holder.begin()
    holder.execute(text("SELECT 1 FROM items WHERE dataset_id = :d FOR UPDATE"),
                   {"d": dataset.id})
    deleting = Run(delete_dataset, db, artifacts, dataset.id)
    deleting.start()
    wait_for_waiters(db, 1)  # the delete waits on the test's item lock
    submitting = Run(submit_training, db, dataset.id, CONFIG)
    submitting.start()
    wait_for_waiters(db, 2)  # the submission waits on the delete
    tx.rollback()
    holder.close()
    assert deleting.outcome() is None
    answer = submitting.outcome()
    assert isinstance(answer, NotFound), repr(answer)
    assert f"dataset {dataset.id} does not exist" in str(answer)
    assert models_of(db, dataset.id) == 0


@pytest.mark.parametrize("kind", ["training", "embedding"])
def test_a_dataset_delete_during_a_submission_is_refused_and_keeps_its_work(
        db, new_dataset, artifacts, ready_model, kind):
    """The submission goes first and is held before its commit (its job row waits on an
    uncommitted job of the test with the same Idempotency-Key); the delete arrives
    meanwhile. It must wait for the submission, see its model or set and job, and refuse
    (409): the set is never cascade-deleted under its job, and no foreign-key error."""
    dataset = new_dataset()
    key = f"held-{uuid.uuid4().hex}"
    holder = db.engine.connect()
    tx = holder.begin()
    holder.execute(text("INSERT INTO jobs (kind, status, params, idempotency_key) "
                        "VALUES ('train', 'cancelled', '{}', :k)"), {"k": key})
    if kind == "training":
        submitting = Run(submit_training, db, dataset.id, CONFIG, idempotency_key=key)
    else:
        submitting = Run(submit_embedding, db, ready_model, dataset.id, idempotency_key=key)
    submitting.start()
    wait_for_waiters(db, 1)  # the submission's job waits on the test's key
    deleting = Run(delete_dataset, db, artifacts, dataset.id)
    deleting.start()
    wait_for_waiters(db, 2)  # the delete waits on the submission
    tx.rollback()
    holder.close()
    job, created = submitting.outcome()
    assert created and job.status == "queued"
    refused = deleting.outcome()
    assert isinstance(refused, Conflict), repr(refused)
    assert get_dataset(db, dataset.id).id == dataset.id  # nothing went
    if kind == "training":
        assert "used by 1 model" in str(refused)
        assert models_of(db, dataset.id) == 1
    else:
        assert f"queued or running job {job.id}" in str(refused)
        assert get_set(db, job.embedding_set_id).status == "pending"
        assert get_job(db, job.id).embedding_set_id == job.embedding_set_id


def test_a_submission_for_a_deleted_dataset_is_not_found(db, new_dataset, artifacts,
                                                         ready_model):
    dataset = new_dataset()
    delete_dataset(db, artifacts, dataset.id)
    with pytest.raises(NotFound, match=f"dataset {dataset.id} does not exist"):
        submit_training(db, dataset.id, CONFIG)
    with pytest.raises(NotFound, match=f"dataset {dataset.id} does not exist"):
        submit_embedding(db, ready_model, dataset.id)


# -- a stale finisher --------------------------------------------------------------------

@pytest.fixture
def writing_set(db, new_dataset, ready_model):
    """An embedding job claimed by owner 'old': its set is being written."""
    job, _ = submit_embedding(db, ready_model, new_dataset().id)
    assert claim(db, job.id, "old", 600).outcome == "claimed"
    assert get_set(db, job.embedding_set_id).status == "writing"
    return job


def test_a_stale_finisher_never_marks_the_set_a_newer_attempt_writes(
        db, settings, writing_set, monkeypatch):
    """The old attempt's finisher reads the job (still its own), then a newer attempt
    takes the job over and starts writing the set; the finisher must not mark that set
    `finishing` (searchable, half-written)."""
    import workers.embedding as embedding
    from workers.context import Context

    job = writing_set
    real_get_set = embedding.get_set

    def get_set_after_a_takeover(db_, set_id):
        got = claim(db, job.id, "new", 600, owner_is_dead=lambda owner: owner == "old")
        assert got.outcome == "claimed" and got.took_over == "old"
        return real_get_set(db_, set_id)

    monkeypatch.setattr(embedding, "get_set", get_set_after_a_takeover)
    ctx = Context(settings, db, None, os.getpid())
    with pytest.raises(Exception) as raised:  # which one: checked below
        embedding.finish_set(ctx, job.id, job.embedding_set_id, "old",
                             [{"rows": 12, "worker": "w"}])
    assert get_set(db, job.embedding_set_id).status == "writing"
    assert isinstance(raised.value, LeaseLost), repr(raised.value)
    row = get_job(db, job.id)
    assert (row.status, row.lease_owner, row.attempts) == ("running", "new", 2)


def test_the_finishing_mark_waits_for_a_claim_in_flight_and_then_sees_it(db, writing_set):
    """A claim by a newer attempt is in flight (job row locked, set set back to writing,
    not committed); the old owner's finishing mark waits for it, then refuses."""
    job = writing_set
    holder = db.engine.connect()
    tx = holder.begin()
    holder.execute(text("SELECT 1 FROM jobs WHERE id = :j FOR UPDATE"), {"j": job.id})
    holder.execute(text("UPDATE jobs SET lease_owner = 'new', attempts = attempts + 1 "
                        "WHERE id = :j"), {"j": job.id})
    holder.execute(text("UPDATE embedding_sets SET status = 'writing' WHERE id = :s"),
                   {"s": job.embedding_set_id})
    marking = Run(mark_finishing, db, job.id, job.embedding_set_id, "old")
    marking.start()
    wait_for_waiters(db, 1)
    tx.commit()
    holder.close()
    assert isinstance(marking.outcome(), LeaseLost)
    assert get_set(db, job.embedding_set_id).status == "writing"
    # the holder of the lease marks it
    mark_finishing(db, job.id, job.embedding_set_id, "new")
    assert get_set(db, job.embedding_set_id).status == "finishing"
    with db.session() as s:
        assert s.get(EmbeddingSet, job.embedding_set_id).status == "finishing"
        assert s.get(Job, job.id).lease_owner == "new"


def test_late_index_statistics_never_cover_a_rebuilt_index(db, ready_model, new_dataset):
    """An index build's statistics land while the set is ready and its index has ended;
    once the set is owed a new build (an append made it large enough), a late write of the
    old build's statistics changes nothing."""
    from store.indexes import index_owed, record_index_stats
    from store.jobs import finish

    dataset = new_dataset()
    job, _ = submit_embedding(db, ready_model, dataset.id)
    assert claim(db, job.id, "w", 60).outcome == "claimed"
    finish(db, job.id, "w", "succeeded")
    set_id = job.embedding_set_id
    assert record_index_stats(db, set_id, {"knn_label_accuracy": 0.5})
    assert get_set(db, set_id).stats == {"knn_label_accuracy": 0.5}
    with db.session() as s:
        s.execute(EmbeddingSet.__table__.update().where(EmbeddingSet.id == set_id)
                  .values(**index_owed()))
    assert not record_index_stats(db, set_id, {"knn_label_accuracy": 0.1})
    assert get_set(db, set_id).stats == {"knn_label_accuracy": 0.5}
    assert not record_index_stats(db, 999_999, {})  # a deleted set: nothing to write
