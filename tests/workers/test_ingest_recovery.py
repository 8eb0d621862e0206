"""Ingest jobs on real worker processes: a pool child killed mid-job (kill -9) is taken
over by its replacement, which resumes after the units staged so far (nothing read twice
into the dataset, nothing missing), and a cancel stops the job at a unit boundary,
leaving no dataset and no staged files."""

import os
import re
import signal

import numpy as np
import pytest
from sqlalchemy import text

from store.datasets import dataset_array, get_dataset, item_rows
from store.jobs import get_job, request_cancel
from store.publishing import publish
from store.submit import submit_ingest
from tests.support import Worker, children_of, counts, wait

ROWS, WIDTH = 500, 8


def npy_folder(root, name, files, seed):
    """`files` .npy files of ROWS x WIDTH distinct values; returns their concatenation."""
    folder = root / name
    folder.mkdir()
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(files):
        part = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
        np.save(folder / f"part-{i:03d}.npy", part)
        parts.append(part)
    return folder, np.concatenate(parts)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return tmp_path_factory.mktemp("ingest-roots")


@pytest.fixture
def ingest_worker(start_worker, worker_env, worker_logs, roots, request):
    start_worker("placeholder", alone=True).stop()  # every other worker stopped
    # A lease far longer than the takeover takes: the job cannot come back by expiry.
    worker = Worker({**worker_env, "LATENTBANK_INGEST_LEASE_SECONDS": "60",
                     "LATENTBANK_ALLOWED_ROOTS": str(roots)}, worker_logs,
                    request.node.name[:40])
    yield worker
    worker.stop()


@pytest.fixture
def registration_blocked(db):
    """Hold every write of item rows back until released (`release()`): the job can read
    and stage its units but cannot register before the test says so (SHARE mode: reads
    and row locks elsewhere go on)."""
    conn = db.engine.connect()
    conn.begin()
    conn.execute(text("LOCK TABLE items IN SHARE MODE"))
    released = []

    def release():
        if not released:
            conn.rollback()
            conn.close()
            released.append(True)

    yield release
    release()


def staged(worker_settings, job_id):
    return worker_settings.data_dir.resolve() / "staging" / f"job-{job_id}"


def test_a_killed_ingest_child_resumes_after_the_staged_units(
        db, ingest_worker, celery_client, roots, worker_settings, worker_artifacts,
        registration_blocked):
    folder, expected = npy_folder(roots, "kill", 40, seed=2401)
    job, _ = submit_ingest(db, "ingest-kill", {"uri": str(folder), "options": {}})
    publish(db, celery_client, job)
    wait("two units read", lambda: get_job(db, job.id).items_done >= 2 * ROWS)
    victim = int(get_job(db, job.id).lease_owner.rsplit(":", 3)[1])
    assert victim in children_of(ingest_worker.proc.pid)
    os.kill(victim, signal.SIGKILL)  # what the OOM killer does
    running = wait("the next attempt", lambda: (j := get_job(db, job.id)).attempts == 2
                   and j.status == "running" and j)
    assert running.lease_owner.rsplit(":", 3)[1] != str(victim)
    resumed = wait("the resume", lambda: re.search(
        rf"ingest resuming job_id={job.id} after staged units=(\d+) of 40 items=(\d+)",
        ingest_worker.log.read_text()))
    units, items = int(resumed.group(1)), int(resumed.group(2))
    assert units >= 2 and items == units * ROWS
    registration_blocked()
    done = wait("the job's end", lambda: (j := get_job(db, job.id)).status in (
        "succeeded", "failed", "cancelled") and j)
    assert done.status == "succeeded", done.error
    dataset = get_dataset(db, done.dataset_id)
    assert dataset.n_items == 40 * ROWS
    values = dataset_array(worker_artifacts, dataset, str(worker_settings.cache_dir))
    np.testing.assert_array_equal(np.asarray(values), expected)  # each row once, in order
    keys = [r.key for r in item_rows(db, dataset.id, 0, dataset.n_items)]
    assert keys == [f"part-{i:03d}/{r}" for i in range(40) for r in range(ROWS)]
    assert not staged(worker_settings, job.id).exists()


def test_a_cancel_stops_at_a_unit_boundary_and_leaves_nothing(
        db, ingest_worker, celery_client, roots, worker_settings, registration_blocked):
    folder, _ = npy_folder(roots, "cancel", 200, seed=2402)
    before = counts(db)
    job, _ = submit_ingest(db, "ingest-cancel", {"uri": str(folder), "options": {}})
    publish(db, celery_client, job)
    wait("a unit read", lambda: get_job(db, job.id).items_done >= ROWS)
    request_cancel(db, job.id)
    done = wait("the cancel", lambda: (j := get_job(db, job.id)).status in (
        "succeeded", "failed", "cancelled") and j)
    assert done.status == "cancelled", (done.status, done.error)
    assert done.items_done < 200 * ROWS and done.dataset_id is None
    registration_blocked()
    assert counts(db) == before
    assert not staged(worker_settings, job.id).exists()
