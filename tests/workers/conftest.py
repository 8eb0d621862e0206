"""Real Celery worker processes against the real Redis and PostgreSQL of the session."""

import os

import pytest
from celery import Celery

from tests.support import Beat, Worker, whole_stack


@pytest.fixture(scope="session")
def db_url(migrated_database):
    """A database of their own: datasets are deduplicated by content, and the store tests
    registered the same digits into another artifact root."""
    return migrated_database("workers")


@pytest.fixture(scope="session")
def db(db_url):  # tests/conftest.py's `db` would keep the first db_url it was given
    from store.db import Database

    database = Database(db_url)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def worker_env(db_url, redis_url, tmp_path_factory):
    data = tmp_path_factory.mktemp("workers")
    env = {**os.environ,
           "LATENTBANK_DATABASE_URL": db_url, "LATENTBANK_REDIS_URL": redis_url,
           "LATENTBANK_DATA_DIR": str(data / "data"),
           "LATENTBANK_ARTIFACTS": (data / "artifacts").as_uri(),
           "LATENTBANK_JOB_LEASE_SECONDS": "3", "LATENTBANK_EMBED_LEASE_SECONDS": "20",
           "LATENTBANK_MAINTENANCE_INTERVAL": "1",
           "LATENTBANK_EMBED_SHARD_ROWS": "400", "LATENTBANK_EXACT_SEARCH_BELOW": "1000",
           "PYTHONUNBUFFERED": "1"}
    return env


@pytest.fixture(scope="session")
def worker_settings(worker_env):
    from store.settings import Settings

    keys = {k[len("LATENTBANK_"):].lower(): v for k, v in worker_env.items()
            if k.startswith("LATENTBANK_")}
    return Settings(**keys)


@pytest.fixture(scope="session")
def worker_artifacts(worker_settings):
    from store.settings import open_artifacts

    return open_artifacts(worker_settings)


@pytest.fixture(scope="session")
def worker_logs(tmp_path_factory):
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture(scope="session")
@whole_stack
def beat(worker_env, worker_logs):
    """The maintenance schedule, as in production: its own process."""
    process = Beat(worker_env, worker_logs)
    yield process
    process.stop()


@pytest.fixture(scope="session")
@whole_stack
def start_worker(worker_env, worker_logs, beat):
    started = []

    def start(name="w1", alone=False, concurrency=1):
        """Start a worker; `alone` stops every other one first, so it takes the next job."""
        if alone:
            for other in started:
                other.stop()
        worker = Worker(worker_env, worker_logs, f"{name}-{len(started)}", concurrency)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def celery_client(redis_url):
    """A client that sends tasks by name, as the API does (no import of workers.tasks)."""
    client = Celery("latentbank-test-client", broker=redis_url, backend=redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"],
                       broker_connection_retry_on_startup=True)
    return client


@pytest.fixture(scope="session")
def digits_dataset(db, worker_artifacts, worker_settings):
    from ingest.arrays import register_digits

    return register_digits(db, worker_artifacts, worker_settings, name="digits-workers").dataset
