"""The three orchestrators (training, embedding, maintenance) as units: for a given job
state, what each one publishes through the sender it is handed (a fake that records),
against an in-process PostgreSQL and no Celery worker."""

import os
import uuid

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

import workers.outages as outages
import workers.training as training
from ingest.arrays import register_file
from store.embedding_sets import get_set
from store.jobs import claim, get_job, request_cancel
from store.publishing import INDEX_TASK
from store.recovery import maintenance_lock
from store.submit import submit_embedding, submit_training
from store.tables import Model
from tests.store.sets import write_latents
from workers.context import Context
from workers.embedding import finish_set, start_embedding
from workers.maintenance import run_maintenance
from workers.sender import FINISH_TASK, RELEASE_TASK, SHARD_TASK
from workers.training import run_training_job

CONFIG = {"model": {"family": "mlp", "input_shape": [4], "latent_dim": 2, "hidden": [8]},
          "training": {"epochs": 1}}
N = 40


class FakeSender:
    """Records what would be published: tasks (name, args, options) and chords."""

    def __init__(self, down=False):
        self.tasks, self.chords, self.down = [], [], down

    def send_task(self, name, args=None, **options):
        if self.down:
            raise ConnectionError("broker down")
        self.tasks.append((name, list(args or []), options))

    def send_chord(self, header, body):
        self.chords.append((header, body))


@pytest.fixture(scope="module")
def db(migrated_database):
    """A database of its own: the session's workers and beat must not take these jobs."""
    from store.db import Database

    database = Database(migrated_database("orchestrators"))
    yield database
    database.dispose()


@pytest.fixture
def sender():
    return FakeSender()


@pytest.fixture
def ctx(db, settings, artifacts, sender):
    return Context(settings.model_copy(update={"embed_shard_rows": 16}), db, artifacts,
                   os.getpid(), sender=sender)


def new_dataset(ctx, values):
    path = ctx.settings.allowed_roots[0] / f"{uuid.uuid4().hex[:8]}.npy"
    np.save(path, values.astype(np.float32))
    return register_file(ctx.db, ctx.artifacts, ctx.settings, f"orch-{path.stem}",
                         str(path)).dataset


@pytest.fixture
def dataset(ctx):
    return new_dataset(ctx, np.random.default_rng().random((N, 4)))


@pytest.fixture
def model_id(ctx, dataset):
    """A ready model row over the dataset (nothing here runs the model)."""
    with ctx.db.session() as s:
        row = Model(dataset_id=dataset.id, status="ready", config=CONFIG)
        s.add(row)
        s.flush()
        return row.id


def tasks_for(sender, job_id):
    return [t for t in sender.tasks if t[1][:1] == [job_id]]


# training


def test_training_with_a_bad_config_fails_and_publishes_nothing(ctx, sender, dataset):
    config = {**CONFIG, "model": {**CONFIG["model"], "family": "nope"}}
    job, _ = submit_training(ctx.db, dataset.id, config)
    assert run_training_job(ctx, job.id) == {"outcome": "failed"}
    row = get_job(ctx.db, job.id)
    assert row.status == "failed" and "family" in row.error
    assert not row.error.startswith("ConfigError")  # the job's own error: its message only
    assert sender.tasks == [] and sender.chords == []


def test_training_delivered_after_its_end_publishes_nothing(ctx, sender, dataset):
    job, _ = submit_training(ctx.db, dataset.id, CONFIG)
    request_cancel(ctx.db, job.id)  # queued: cancelled at once
    assert run_training_job(ctx, job.id) == {"outcome": "terminal"}
    assert get_job(ctx.db, job.id).status == "cancelled"
    assert sender.tasks == []


def test_an_outage_during_training_requeues_and_publishes_the_job_again(
        ctx, sender, dataset, monkeypatch):
    def away(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, ConnectionError("server closed the connection"))

    monkeypatch.setattr(training, "train_evaluate_export", away)
    job, _ = submit_training(ctx.db, dataset.id, CONFIG)
    assert run_training_job(ctx, job.id) == {"outcome": "released"}
    row = get_job(ctx.db, job.id)
    assert (row.status, row.attempts, row.lease_owner) == ("queued", 1, None)
    assert row.published_at is not None and "OperationalError" in row.progress_message
    assert sender.tasks == [("latentbank.train", [job.id], {"queue": "train", "retry": False})]


def test_an_attempt_the_database_cannot_be_told_of_sends_its_release(ctx, sender, dataset,
                                                                     monkeypatch):
    """The release itself meets the outage: the release task is sent, retried until the
    database answers; the job stays running until then."""
    def away(*args, **kwargs):
        raise OperationalError("UPDATE jobs", {}, ConnectionError("connection refused"))

    monkeypatch.setattr(training, "train_evaluate_export", away)
    monkeypatch.setattr(outages, "release", away)
    job, _ = submit_training(ctx.db, dataset.id, CONFIG)
    assert run_training_job(ctx, job.id) == {"outcome": "released"}
    row = get_job(ctx.db, job.id)
    assert row.status == "running"
    [(name, args, options)] = sender.tasks
    assert (name, args[:2], options) == (RELEASE_TASK, [job.id, row.lease_owner],
                                         {"countdown": 1})
    assert args[2].startswith("attempt ended by OperationalError")


# embedding


def test_an_embedding_job_fans_its_shards_out_as_one_chord(ctx, sender, model_id, dataset):
    job, _ = submit_embedding(ctx.db, model_id, dataset.id)
    assert start_embedding(ctx, job.id) == {"outcome": "dispatched", "shards": 3}
    row = get_job(ctx.db, job.id)
    owner, set_id = row.lease_owner, job.embedding_set_id
    assert row.status == "running" and owner
    assert sender.chords == [([(SHARD_TASK, [job.id, set_id, a, b, owner])
                               for a, b in [(0, 16), (16, 32), (32, 40)]],
                              (FINISH_TASK, [job.id, set_id, owner]))]
    assert sender.tasks == []
    assert start_embedding(ctx, job.id) == {"outcome": "busy"}  # a second delivery
    assert len(sender.chords) == 1


def test_an_embedding_job_over_unfit_values_fails_before_any_shard(ctx, sender, model_id):
    """The worker checks the values again (the API did at submission): a dataset whose
    stored range no longer suits the model fails the job before any shard is sent."""
    unfit = new_dataset(ctx, np.random.default_rng().random((N, 4)))
    job, _ = submit_embedding(ctx.db, model_id, unfit.id)
    with ctx.db.engine.begin() as conn:  # a Bernoulli model takes values in [0, 1]
        conn.execute(text("UPDATE datasets SET max_value = 5 WHERE id = :d"), {"d": unfit.id})
    assert start_embedding(ctx, job.id) == {"outcome": "failed"}
    row = get_job(ctx.db, job.id)
    assert row.status == "failed" and f"dataset {unfit.id} cannot be embedded" in row.error
    assert sender.chords == [] and sender.tasks == []


def written(ctx, model_id, dataset, owner="embedder"):
    """An embedding job claimed by `owner` whose set holds all its rows."""
    job, _ = submit_embedding(ctx.db, model_id, dataset.id)
    assert claim(ctx.db, job.id, owner, 600).outcome == "claimed"
    mu = np.random.default_rng(job.id).normal(size=(N, 2)).astype(np.float32)
    zeros = np.zeros(N)
    write_latents(ctx.db, job.embedding_set_id, 0, mu, mu, zeros - 1, zeros, zeros + 1)
    return job


def test_a_finished_set_is_ready_and_its_index_task_is_sent(ctx, sender, model_id, dataset):
    job = written(ctx, model_id, dataset)
    results = [{"rows": 16, "worker": "w"}, {"rows": 16, "worker": "w"},
               {"rows": 8, "worker": "v"}]
    out = finish_set(ctx, job.id, job.embedding_set_id, "embedder", results)
    assert out["outcome"] == "succeeded"
    assert out["stats"]["workers"] == {"w": 2, "v": 1}
    es = get_set(ctx.db, job.embedding_set_id)
    assert (es.status, es.index_status) == ("ready", "building")
    assert es.index_sent_at is not None
    assert sender.tasks == [(INDEX_TASK, [job.embedding_set_id],
                             {"queue": "embed", "retry": False})]
    assert get_job(ctx.db, job.id).status == "succeeded"


def test_a_finish_with_the_broker_down_leaves_the_index_owed(model_id, dataset, ctx):
    ctx.sender = FakeSender(down=True)
    job = written(ctx, model_id, dataset)
    assert finish_set(ctx, job.id, job.embedding_set_id, "embedder",
                      [{"rows": N}])["outcome"] == "succeeded"
    es = get_set(ctx.db, job.embedding_set_id)
    assert (es.status, es.index_status, es.index_sent_at) == ("ready", "building", None)


def test_a_cancelled_or_stale_finish_publishes_nothing(ctx, sender, model_id, dataset):
    job = written(ctx, model_id, dataset)
    assert finish_set(ctx, job.id, job.embedding_set_id, "someone-else",
                      [{"rows": N}]) == {"outcome": "stale"}
    request_cancel(ctx.db, job.id)
    assert finish_set(ctx, job.id, job.embedding_set_id, "embedder",
                      [{"rows": N}]) == {"outcome": "cancelled"}
    assert get_set(ctx.db, job.embedding_set_id).status == "cancelled"
    assert get_job(ctx.db, job.id).status == "cancelled"
    assert sender.tasks == []


# maintenance


def test_maintenance_publishes_a_job_never_sent_once(ctx, sender, dataset):
    job, _ = submit_training(ctx.db, dataset.id, CONFIG)
    down = FakeSender(down=True)
    run_maintenance(ctx.db, down, None, 3, grace_seconds=0.0)
    assert get_job(ctx.db, job.id).published_at is None  # stays owed
    run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0)
    assert tasks_for(sender, job.id) == [("latentbank.train", [job.id],
                                          {"queue": "train", "retry": False})]
    run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0)
    assert len(tasks_for(sender, job.id)) == 1  # sent: not again


def test_maintenance_requeues_a_job_whose_lease_ran_out_and_sends_it(ctx, sender, dataset):
    job, _ = submit_training(ctx.db, dataset.id, CONFIG)
    assert claim(ctx.db, job.id, "far-away-host/m/b/1:1:1:x", 600).outcome == "claimed"
    run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0)
    assert tasks_for(sender, job.id) == []  # a live lease elsewhere: left alone
    with ctx.db.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' "
                          "WHERE id = :j"), {"j": job.id})
    counts = run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0)
    assert counts["requeued"] >= 1 and counts["published"] >= 1
    row = get_job(ctx.db, job.id)
    assert (row.status, row.attempts, row.lease_owner) == ("queued", 1, None)
    assert tasks_for(sender, job.id) == [("latentbank.train", [job.id],
                                          {"queue": "train", "retry": False})]


def test_a_pass_that_finds_the_lock_taken_publishes_nothing(ctx, sender, dataset):
    job, _ = submit_training(ctx.db, dataset.id, CONFIG)
    with maintenance_lock(ctx.db) as taken:
        assert taken
        assert run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0) == {
            "requeued": -1, "published": -1, "stalled": -1, "indexes_sent": -1,
            "indexes_failed": -1}
    assert sender.tasks == []
    assert get_job(ctx.db, job.id).published_at is None


# a stalled embedding attempt (the broker lost a shard's message or the chord's count)


def stalled(ctx, model_id, dataset, shards_written, owner="stalled-embedder"):
    """An embedding job claimed by `owner` (lease 600 s) whose shards in
    `shards_written` (of (0, 16), (16, 32), (32, 40)) hold their rows, with its last
    heartbeat a minute ago and its task sent then."""
    job, _ = submit_embedding(ctx.db, model_id, dataset.id)
    assert claim(ctx.db, job.id, owner, 600).outcome == "claimed"
    rng = np.random.default_rng(job.id)
    for a, b in shards_written:
        mu = rng.normal(size=(b - a, 2)).astype(np.float32)
        zeros = np.zeros(b - a)
        write_latents(ctx.db, job.embedding_set_id, a, mu, mu, zeros - 1, zeros, zeros + 1)
    quiet(ctx, job.id, 60)
    return job


def quiet(ctx, job_id, seconds):
    with ctx.db.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET heartbeat_at = now() - make_interval(secs => :t), "
                          "published_at = now() - make_interval(secs => :t) WHERE id = :j"),
                     {"j": job_id, "t": seconds})


def test_a_stalled_attempt_is_sent_its_unwritten_shards_alone(ctx, sender, model_id,
                                                              dataset):
    """Two of three shards written, none running for 60 s: the missing one goes again, on
    its own (the chord's count is what may have been lost) and told to finish the job;
    the next pass, at once, sends nothing (the nudge backs off)."""
    job = stalled(ctx, model_id, dataset, [(0, 16), (32, 40)])
    owner, set_id = "stalled-embedder", job.embedding_set_id
    counts = run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0, stall=(30.0, 16))
    assert counts["stalled"] >= 1
    assert tasks_for(sender, job.id) == [(SHARD_TASK, [job.id, set_id, 16, 32, owner, True],
                                          {"queue": "embed", "retry": False})]
    run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0, stall=(30.0, 16))
    assert len(tasks_for(sender, job.id)) == 1  # nudged: not again within the stall
    row = get_job(ctx.db, job.id)
    assert (row.status, row.attempts, row.lease_owner) == ("running", 1, owner)
    quiet(ctx, job.id, 31)  # a stall later, still nothing came: nudged again
    run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0, stall=(30.0, 16))
    assert [t[1][2:4] for t in tasks_for(sender, job.id)] == [[16, 32], [16, 32]]


def test_the_shards_are_cut_where_the_attempt_cut_them(ctx, sender, model_id, dataset):
    """The coordinator records its shard size in the job; a maintenance pass whose own
    `embed_shard_rows` differs (7 here) cuts the same shards (overlapping cuts would
    collide on the rows' keys)."""
    job, _ = submit_embedding(ctx.db, model_id, dataset.id)
    assert start_embedding(ctx, job.id)["shards"] == 3
    row = get_job(ctx.db, job.id)
    assert row.params["shard_rows"] == 16
    quiet(ctx, job.id, 60)
    run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0, stall=(30.0, 7))
    assert [t[1][2:4] for t in tasks_for(sender, job.id)] == [[0, 16], [16, 32], [32, 40]]


def test_a_stalled_attempt_with_every_row_written_is_sent_its_finish(ctx, sender,
                                                                     model_id, dataset):
    """Every row written but no finishing step came (the chord's count was lost): the
    pass sends the finishing step with no shard results, and that step makes the set
    ready, saying who finished it."""
    job = stalled(ctx, model_id, dataset, [(0, 16), (16, 32), (32, 40)])
    owner, set_id = "stalled-embedder", job.embedding_set_id
    run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0, stall=(30.0, 16))
    finish_call = [t for t in sender.tasks if t[0] == FINISH_TASK and t[1][1] == job.id]
    assert finish_call == [(FINISH_TASK, [[], job.id, set_id, owner],
                            {"queue": "embed", "retry": False})]
    out = finish_set(ctx, job.id, set_id, owner, [])
    assert out["outcome"] == "succeeded" and out["stats"]["n_items"] == N
    assert out["stats"]["finished_by"].startswith("maintenance")
    # no shard said whether the values were 0/1: read again, grey values under a
    # Bernoulli model that does not binarise give no likelihood
    assert out["stats"]["likelihood_kind"] == "unnormalised"
    assert get_set(ctx.db, set_id).status == "ready"
    assert finish_set(ctx, job.id, set_id, owner, []) == {"outcome": "stale"}  # a duplicate


def test_an_attempt_that_beats_or_ended_is_not_nudged(ctx, sender, model_id, dataset):
    """A heartbeat 10 s old (under the 30 s stall), or a lease run out (requeue's case),
    or a cancel asked (then the finish goes, which cancels): no shard is sent."""
    beating = stalled(ctx, model_id, dataset, [(0, 16)])
    quiet(ctx, beating.id, 10)
    expired = stalled(ctx, model_id, dataset, [(0, 16)], owner="far-away-host/m/b/1:1:1:x")
    with ctx.db.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' "
                          "WHERE id = :j"), {"j": expired.id})
    cancelled = stalled(ctx, model_id, dataset, [(0, 16)])
    request_cancel(ctx.db, cancelled.id)
    run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0, stall=(30.0, 16))
    assert tasks_for(sender, beating.id) == []
    assert [t[0] for t in tasks_for(sender, expired.id)] in ([], ["latentbank.embed"])
    assert [t for t in sender.tasks if t[0] == SHARD_TASK and t[1][0] == cancelled.id] == []
    assert [t[1][1:] for t in sender.tasks if t[0] == FINISH_TASK
            and t[1][1] == cancelled.id] == [[cancelled.id, cancelled.embedding_set_id,
                                              "stalled-embedder"]]


def test_a_finish_with_no_shard_results_reads_binary_values_as_discrete(ctx, sender,
                                                                        model_id):
    """The same finish over 0/1 values (a rounded copy of the data): the figure is a
    probability of binary data."""
    binary = new_dataset(ctx, np.random.default_rng(3).random((N, 4)).round())
    job = stalled(ctx, model_id, binary, [(0, 16), (16, 32), (32, 40)])
    out = finish_set(ctx, job.id, job.embedding_set_id, "stalled-embedder", [])
    assert out["stats"]["likelihood_kind"] == "discrete"


def test_an_attempt_whose_shard_is_writing_is_not_nudged(ctx, sender, model_id, dataset):
    """A shard holds the job's row (FOR SHARE) for its whole write transaction, so its
    heartbeat waits for the commit and can be older than the stall: a K = 5000 shard
    writes for minutes on CPU. While that lock is held the job is not stalled; once the
    transaction ends (here: the shard's worker gone), it is."""
    from store.jobs import lease_guard

    job = stalled(ctx, model_id, dataset, [(0, 16)])
    with ctx.db.engine.connect() as conn:
        tx = conn.begin()
        lease_guard(conn, job.id, "stalled-embedder")
        run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0, stall=(30.0, 16))
        assert tasks_for(sender, job.id) == []
        tx.rollback()
    run_maintenance(ctx.db, sender, None, 3, grace_seconds=0.0, stall=(30.0, 16))
    assert [t[1][2:4] for t in tasks_for(sender, job.id)] == [[16, 32], [32, 40]]
