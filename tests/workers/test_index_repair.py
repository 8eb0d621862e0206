"""No set stays `index_status = 'building'` for good: the set is owed its index in the
transaction that makes it ready, an index build runs under a lease, a build that fails
(in CREATE INDEX or in calibration) says `failed` with its reason, and the maintenance
pass sends again a build whose task or worker was lost, or marks it failed once its
attempts are spent. Real PostgreSQL; the broker is a stand-in that records what was sent
(the end-to-end tests run the real one)."""

import contextlib
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from sqlalchemy import text

import store.indexes as indexes
from store.deletion import delete_set
from store.embedding_sets import get_set
from store.errors import Conflict
from store.indexes import build_index, claim_index
from store.jobs import claim, get_job
from store.registry import delete_model
from store.submit import submit_embedding
from store.tables import Model
from tests.store.sets import count_latents, ready_set, write_latents
from workers.maintenance import run_maintenance

CONFIG = {"model": {"family": "mlp", "input_shape": [4], "latent_dim": 2, "hidden": [8]},
          "training": {"epochs": 1}}
N = 40


@pytest.fixture(scope="module")
def db(migrated_database):
    """A database of its own: the session's workers (and their beat's maintenance passes)
    must not take these sets' index tasks."""
    from store.db import Database

    database = Database(migrated_database("repair"))
    yield database
    database.dispose()


def sent_for(broker, set_id):
    return [s for s in broker.sent if s[1] == [set_id]]


def repair(db, broker):
    """One maintenance pass (republish after 30 s, 3 attempts)."""
    return run_maintenance(db, broker, 30, 3)


class Broker:
    """Stands in for Celery: records each task sent, or fails like a broker that is down."""

    def __init__(self, down=False):
        self.sent, self.down = [], down

    def send_task(self, name, args=(), **options):
        if self.down:
            raise ConnectionError("broker down")
        self.sent.append((name, list(args), options.get("queue")))


@pytest.fixture
def settings(worker_settings, tmp_path):
    return worker_settings.model_copy(update={
        "exact_search_below": 10, "data_dir": tmp_path / "data",
        "index_lease_seconds": 60.0, "index_max_attempts": 3})


@pytest.fixture
def model_id(db, worker_artifacts, settings, tmp_path):
    """A ready model row over a small dataset of its own (nothing here runs the model)."""
    from ingest.arrays import register_file

    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng().random((N, 4), dtype=np.float32))
    dataset = register_file(db, worker_artifacts, settings, f"repair-{uuid.uuid4().hex[:8]}",
                            str(path)).dataset
    with db.session() as s:
        row = Model(dataset_id=dataset.id, status="ready", config=CONFIG)
        s.add(row)
        s.flush()
        return row.id


@pytest.fixture
def written(db, model_id):
    """An embedding job claimed by 'embedder' whose set holds all its rows."""
    dataset_id = get_model_dataset(db, model_id)
    job, _ = submit_embedding(db, model_id, dataset_id)
    assert claim(db, job.id, "embedder", 600).outcome == "claimed"
    mu = np.random.default_rng(job.id).normal(size=(N, 2)).astype(np.float32)
    zeros = np.zeros(N)
    write_latents(db, job.embedding_set_id, 0, mu, mu, zeros - 1, zeros, zeros + 1)
    return job


def get_model_dataset(db, model_id):
    with db.session() as s:
        return s.get(Model, model_id).dataset_id


def context(db, settings):
    from workers.context import Context

    return Context(settings, db, None, os.getpid())


def age(db, set_id, **columns):
    """Move the set's index timestamps into the past (as if time had passed)."""
    sets = ", ".join(f"{k} = now() - interval '{v} seconds'" for k, v in columns.items())
    with db.engine.begin() as conn:
        conn.execute(text(f"UPDATE embedding_sets SET {sets} WHERE id = :s"), {"s": set_id})


def dead_owner():
    """An owner of this machine whose process has exited."""
    child = subprocess.Popen([sys.executable, "-c",
                              "from workers.lease import new_owner; print(new_owner())"],
                             stdout=subprocess.PIPE, text=True)
    return child.communicate()[0].strip()


def ready_building_set(db, model_id, n=N):
    """A ready set left at `index_status = 'building'` with nothing building it: what the
    first wave left when its worker died between the commit and the index task."""
    def write(set_id):
        mu = np.random.default_rng(set_id).normal(size=(n, 2)).astype(np.float32)
        zeros = np.zeros(n)
        write_latents(db, set_id, 0, mu, mu, zeros, zeros, zeros)

    set_id = ready_set(db, model_id, get_model_dataset(db, model_id), write, owed_index=True)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE embedding_sets SET ready_at = now() - interval '1 hour', "
                          "created_at = now() - interval '1 hour', "
                          "index_requested_at = now() - interval '1 hour' WHERE id = :s"),
                     {"s": set_id})
    return set_id


def test_a_broker_error_after_the_set_is_ready_leaves_it_owed_and_maintenance_sends_it(
        db, settings, written, monkeypatch):
    """The set is committed ready, then sending its index task fails (the broker is down;
    a worker killed at that point is the same): the set records that it is owed an
    index, and the maintenance pass sends it; the build then completes."""
    import workers.app
    from workers.embedding import finish_set, index_set
    from workers.lease import new_owner

    def down(*args, **kwargs):
        raise ConnectionError("broker down")

    monkeypatch.setattr(workers.app.app, "send_task", down)
    job, set_id = written, written.embedding_set_id
    # (the first wave let the broker's error out, after the commit; this one logs it)
    with contextlib.suppress(ConnectionError):
        finish_set(context(db, settings), job.id, set_id, "embedder", [{"rows": N}])
    assert get_job(db, job.id).status == "succeeded"
    es = get_set(db, set_id)
    assert (es.status, es.index_status) == ("ready", "building")
    broker = Broker()
    repair(db, broker)
    assert sent_for(broker, set_id) == []  # left to its worker for a grace period
    age(db, set_id, index_requested_at=11, ready_at=11)
    repair(db, broker)
    assert sent_for(broker, set_id) == [("latentbank.embed_index", [set_id], "embed")]
    assert get_set(db, set_id).index_sent_at is not None
    repair(db, broker)
    assert len(sent_for(broker, set_id)) == 1  # sent: not again yet
    # the task the maintenance pass sent runs
    assert index_set(context(db, settings), set_id, new_owner())["outcome"] == "ready"
    es = get_set(db, set_id)
    assert (es.index_status, es.index_owner, es.index_attempts) == ("ready", None, 1)
    assert es.stats["index"]["status"] == "ready"


def test_a_set_left_building_by_the_first_wave_is_repaired(db, settings, model_id):
    """A ready set at `building` with no index task anywhere (a worker died between the
    commit and the send, before this version): the next pass sends its build, and
    meanwhile it can be deleted (no live build holds it)."""
    set_id = ready_building_set(db, model_id)
    broker = Broker()
    repair(db, broker)
    assert sent_for(broker, set_id) == [("latentbank.embed_index", [set_id], "embed")]
    other = ready_building_set(db, model_id)
    delete_set(db, other)  # the first wave answered 409 for good
    assert count_latents(db, other) == 0


def test_a_calibration_failure_marks_the_index_failed_with_its_reason(
        db, settings, model_id, monkeypatch):
    """CREATE INDEX succeeded, calibration raised: the index says `failed` and why,
    searches stay exact, and the set and its model can be deleted."""
    from store.search import search

    set_id = ready_building_set(db, model_id)

    def broken(*args, **kwargs):
        raise RuntimeError("calibration blew up")

    monkeypatch.setattr(indexes, "_calibrate", broken)
    with pytest.raises(RuntimeError, match="calibration blew up"):
        build_index(db, set_id, settings)
    es = get_set(db, set_id)
    assert es.index_status == "failed"
    assert es.index_error == "RuntimeError: calibration blew up"
    assert es.stats["index"] == {"status": "failed", "error": "RuntimeError: calibration blew up"}
    assert search(db, settings, set_id, vector=[0.0, 0.0], k=3).plan == "exact"
    delete_set(db, set_id)
    assert count_latents(db, set_id) == 0


def test_an_index_task_that_fails_marks_the_index_failed(db, settings, model_id,
                                                         monkeypatch):
    """The Celery task's own path: a failure that is not an outage ends the build
    `failed` with the reason, not `building`."""
    from workers.tasks import embed_index

    set_id = ready_building_set(db, model_id)
    monkeypatch.setattr("workers.tasks.context", lambda: context(db, settings))

    def broken(*args, **kwargs):
        raise ValueError("no such operator class")

    monkeypatch.setattr("workers.embedding.build_index", broken)
    with pytest.raises(ValueError):
        embed_index.apply(args=[set_id], throw=True)
    es = get_set(db, set_id)
    assert (es.index_status, es.index_owner) == ("failed", None)
    assert es.index_error == "ValueError: no such operator class"


def test_a_build_whose_worker_died_is_sent_again_then_marked_failed(db, settings, model_id):
    """Each build's worker dies mid-build: the pass takes its lease over at once (its
    owner is a process of this machine that no longer exists) and sends the build
    again, until `index_max_attempts` builds started; then the index is marked failed,
    and the model can be deleted."""
    set_id = ready_building_set(db, model_id)
    broker = Broker()
    for attempt in range(1, 4):
        assert claim_index(db, set_id, dead_owner(), 600, 3) == "claimed"
        assert get_set(db, set_id).index_attempts == attempt
        with pytest.raises(Conflict, match="being built"):
            delete_set(db, set_id)  # a live lease: the pass has not judged it yet
        repair(db, broker)
        if attempt < 3:
            assert len(sent_for(broker, set_id)) == attempt
            es = get_set(db, set_id)
            assert (es.index_status, es.index_owner) == ("building", None)
    assert len(sent_for(broker, set_id)) == 2
    es = get_set(db, set_id)
    assert es.index_status == "failed" and es.index_owner is None
    assert es.index_error.startswith("gave up after 3 attempt(s)")
    assert delete_model(db, _Artifacts(), model_id) == [set_id]


class _Artifacts:
    def delete(self, key):
        pass


def test_an_expired_lease_is_sent_again_and_a_live_one_is_left_alone(db, settings, model_id):
    """An owner elsewhere (never judged here) holds the build: left alone while its lease
    lives, sent again once it ran out."""
    set_id = ready_building_set(db, model_id)
    far = "another-host/m/b/1:123:456:abcdef12"
    assert claim_index(db, set_id, far, 600, 3) == "claimed"
    broker = Broker()
    repair(db, broker)
    assert sent_for(broker, set_id) == []
    assert claim_index(db, set_id, "someone-else", 600, 3) == "busy"
    age(db, set_id, index_lease_expires_at=1)
    repair(db, broker)
    assert len(sent_for(broker, set_id)) == 1
    assert claim_index(db, set_id, "next", 600, 3) == "claimed"
    assert get_set(db, set_id).index_attempts == 2


def test_claims_of_an_index_build(db, settings, model_id):
    set_id = ready_building_set(db, model_id)
    assert claim_index(db, set_id, "a", 600, 3) == "claimed"
    assert claim_index(db, set_id, "a", 600, 3) == "claimed"  # a retry: no new attempt
    assert get_set(db, set_id).index_attempts == 1
    assert claim_index(db, set_id, "b", 600, 3) == "busy"
    assert claim_index(db, set_id, "b", 600, 3, owner_is_dead=lambda o: o == "a") == "claimed"
    assert get_set(db, set_id).index_attempts == 2
    assert build_index(db, set_id, settings, owner="a").status == "ready"  # stale: fenced
    assert get_set(db, set_id).index_status == "building"
    assert build_index(db, set_id, settings, owner="b").status == "ready"
    es = get_set(db, set_id)
    assert (es.index_status, es.index_owner, es.index_lease_expires_at) == ("ready", None, None)
    assert claim_index(db, set_id, "c", 600, 3) == "not_owed"
    assert claim_index(db, 10**12, "c", 600, 3) == "missing"


def test_an_outage_that_outlasts_the_retries_marks_the_index_failed(db, settings, model_id,
                                                                    monkeypatch):
    """Every try meets the database away (an error of the connection, which a retry may
    outlive): the task retries as the same owner (one attempt counted, not one per
    retry), then marks the index failed with the reason instead of leaving it
    `building`."""
    from sqlalchemy.exc import OperationalError

    from workers.outages import SHARD_RETRIES
    from workers.tasks import embed_index

    set_id = ready_building_set(db, model_id)
    monkeypatch.setattr("workers.tasks.context", lambda: context(db, settings))
    tries = []

    def away(db_, set_id_, settings_, owner=None, **kwargs):
        tries.append(owner)
        raise OperationalError("SELECT 1", {}, ConnectionError("server closed the connection"))

    monkeypatch.setattr("workers.embedding.build_index", away)
    result = embed_index.apply(args=[set_id], throw=False)  # retries run eagerly too
    assert isinstance(result.result, OperationalError), result.result
    assert len(tries) == SHARD_RETRIES + 1 and len(set(tries)) == 1
    es = get_set(db, set_id)
    assert (es.index_status, es.index_owner, es.index_attempts) == ("failed", None, 1)
    assert es.index_error.startswith(f"the database stayed away through {SHARD_RETRIES} "
                                     "retries (OperationalError")


def test_a_build_taken_over_mid_way_writes_neither_its_outcome_nor_its_stats(
        db, settings, model_id, monkeypatch):
    """Build 'a' loses its lease while it runs ('b' takes the set over and ends it failed):
    'a' must not write 'ready' or its kNN statistics over b's outcome."""
    import workers.embedding as embedding

    set_id = ready_building_set(db, model_id)
    real = embedding.build_index

    def taken_over_meanwhile(db_, set_id_, settings_, owner):
        assert claim_index(db, set_id, "b", 600, 3, owner_is_dead=lambda o: o == "a") \
            == "claimed"
        indexes._set_index(db, set_id, "failed", None, "b", error="b's reason")
        return real(db_, set_id_, settings_, owner=owner)

    monkeypatch.setattr(embedding, "build_index", taken_over_meanwhile)
    assert embedding.index_set(context(db, settings), set_id, "a") == {"outcome": "superseded"}
    es = get_set(db, set_id)
    assert es.index_status == "failed" and es.index_error == "b's reason"
    assert es.stats["index"]["status"] == "failed" and "knn_label_accuracy" not in es.stats
