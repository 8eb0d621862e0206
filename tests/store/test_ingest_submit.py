"""Ingest jobs in the store: submitted with an Idempotency-Key, their progress written only
by the lease holder (which learns of a cancel from it), and ended naming their dataset."""

import numpy as np
import pytest

from store.errors import IdempotencyMismatch
from store.jobs import LeaseLost, claim, finish, get_job, ingest_progress, request_cancel
from store.publishing import QUEUES, TASKS, WORKER_QUEUES
from store.submit import submit_ingest


def test_the_ingest_queue_is_consumed_by_default():
    assert TASKS["ingest"] == "latentbank.ingest" and QUEUES["ingest"] == "ingest"
    assert "ingest" in WORKER_QUEUES.split(",")


def test_submit_is_idempotent_and_bound_to_its_request(db):
    params = {"uri": "/data/x", "options": {"color": "grey"}}
    job, created = submit_ingest(db, "ingest-store", params, idempotency_key="ing-1",
                                 request_hash="h1")
    assert created and (job.kind, job.status) == ("ingest", "queued")
    assert job.params == {"name": "ingest-store", **params}
    again, created = submit_ingest(db, "ingest-store", params, idempotency_key="ing-1",
                                   request_hash="h1")
    assert (again.id, created) == (job.id, False)
    with pytest.raises(IdempotencyMismatch):
        submit_ingest(db, "other", params, idempotency_key="ing-1", request_hash="h2")


def test_progress_is_the_holders_and_tells_of_a_cancel(db):
    job, _ = submit_ingest(db, "ingest-progress", {"uri": "/x", "options": {}})
    assert claim(db, job.id, "owner-a", 30).outcome == "claimed"
    assert ingest_progress(db, job.id, "owner-a", 120, 500) is False
    row = get_job(db, job.id)
    assert (row.items_done, row.items_total) == (120, 500)
    with pytest.raises(LeaseLost):
        ingest_progress(db, job.id, "owner-b", 999)
    assert get_job(db, job.id).items_done == 120
    request_cancel(db, job.id)
    assert ingest_progress(db, job.id, "owner-a", 130) is True
    assert get_job(db, job.id).items_total == 500  # kept when not told again


def test_finish_names_the_dataset(db, settings, artifacts, tmp_path):
    from ingest.arrays import register_file

    np.save(tmp_path / "d.npy", np.random.default_rng(2406).normal(size=(5, 2)))
    dataset = register_file(db, artifacts, settings, "ingest-finish", str(tmp_path / "d.npy"))
    job, _ = submit_ingest(db, "ingest-finish", {"uri": "/x", "options": {}})
    assert claim(db, job.id, "owner-a", 30).outcome == "claimed"
    with pytest.raises(LeaseLost):
        finish(db, job.id, "owner-b", "succeeded", dataset_id=dataset.dataset.id)
    finish(db, job.id, "owner-a", "succeeded", message="done",
           dataset_id=dataset.dataset.id)
    row = get_job(db, job.id)
    assert (row.status, row.dataset_id, row.progress) == ("succeeded", dataset.dataset.id, 1.0)
