"""Recovery of the job system with real worker processes: the prefork parent holds no
thread that could hand a child a held lock, and a killed pool child's job is taken over
by the replacement child at once (not after its lease), resuming from its checkpoint."""

import os
import re
import signal

from store.jobs import get_job
from store.publishing import publish
from tests.support import Worker, children_of, submit_train
from tests.support import wait as wait_for_it

MODEL = {"family": "mlp", "latent_dim": 4, "hidden": [64, 32], "likelihood": "bernoulli"}
TRAINING = {"epochs": 300, "batch_size": 64, "lr": 0.002, "seed": 1,
            "importance_samples": 10, "eval_importance_samples": 4}


def threads_of(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def wait(what, check):
    return wait_for_it(what, check, timeout=90)


def epochs(db, model_id):
    from sqlalchemy import text

    with db.engine.connect() as conn:
        return conn.execute(text("SELECT count(DISTINCT epoch) FROM training_metrics "
                                 "WHERE model_id = :m"), {"m": model_id}).scalar_one()


def test_the_prefork_parent_runs_no_thread_and_a_replacement_child_runs_tasks(
        db, start_worker, worker_env, worker_logs, celery_client, digits_dataset):
    start_worker("placeholder", alone=True).stop()  # every other worker stopped
    # A lease far longer than the takeover takes: the job cannot come back by expiry.
    worker = Worker({**worker_env, "LATENTBANK_JOB_LEASE_SECONDS": "60"}, worker_logs,
                    "parent")
    try:
        _kill_a_child_mid_training(db, worker, celery_client, digits_dataset)
    finally:
        worker.stop()


def _kill_a_child_mid_training(db, worker, celery_client, digits_dataset):
    # beat's maintenance passes have run in the pool (the first wave ran them in a thread
    # of the parent, whose import lock a forked replacement child inherited held)
    wait("a maintenance pass", lambda: "latentbank.maintenance" in worker.log.read_text())
    assert threads_of(worker.proc.pid) == 1
    job, _ = submit_train(db, digits_dataset, MODEL, TRAINING)
    publish(db, celery_client, job)
    wait("two epochs", lambda: epochs(db, job.model_id) >= 2)
    victim = int(get_job(db, job.id).lease_owner.rsplit(":", 3)[1])
    assert victim in children_of(worker.proc.pid)
    os.kill(victim, signal.SIGKILL)  # what the OOM killer does
    # The replacement child takes the job over from its dead owner, without waiting for
    # the lease to run out, and resumes from the checkpoint.
    running = wait("the next attempt", lambda: (j := get_job(db, job.id)).attempts == 2
                   and j.status == "running" and j)
    assert running.lease_owner.rsplit(":", 3)[1] != str(victim)
    resumed = wait("the resume", lambda: re.search(
        rf"resuming job_id={job.id} from epoch (\d+)", worker.log.read_text()))
    assert int(resumed.group(1)) >= 2
    assert re.search(rf"took over job_id={job.id} from dead owner=\S+:{victim}:",
                     worker.log.read_text())
    assert threads_of(worker.proc.pid) == 1
    from store.jobs import request_cancel

    request_cancel(db, job.id)
    assert wait("the cancel", lambda: get_job(db, job.id).status == "cancelled")
