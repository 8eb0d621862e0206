"""The API served by uvicorn on a real socket, with real PostgreSQL, Redis and a worker."""

import os

import httpx
import pytest

from tests.support import Served, Worker, settings_of, whole_stack

MiB = 1 << 20


@pytest.fixture(scope="session")
def api_db_url(migrated_database):
    return migrated_database("api")


@pytest.fixture(scope="session")
def api_env(api_db_url, api_redis_url, tmp_path_factory):
    data = tmp_path_factory.mktemp("api")
    (data / "allowed").mkdir()
    return {"LATENTBANK_DATABASE_URL": api_db_url, "LATENTBANK_REDIS_URL": api_redis_url,
            "LATENTBANK_DATA_DIR": str(data / "data"),
            "LATENTBANK_ARTIFACTS": (data / "artifacts").as_uri(),
            "LATENTBANK_ALLOWED_ROOTS": str(data / "allowed"),
            "LATENTBANK_MAX_UPLOAD_BYTES": str(4 * MiB),
            "LATENTBANK_MAX_REQUEST_BYTES": str(1 * MiB),
            "LATENTBANK_JOB_LEASE_SECONDS": "5", "LATENTBANK_MAINTENANCE_INTERVAL": "1",
            "LATENTBANK_EMBED_SHARD_ROWS": "600", "LATENTBANK_EXACT_SEARCH_BELOW": "1000",
            "LATENTBANK_SSE_POLL_SECONDS": "0.2"}


@pytest.fixture(scope="session")
def api_settings(api_env):
    return settings_of(api_env)


@pytest.fixture(scope="session")
def api_db(api_db_url):
    from store.db import Database

    database = Database(api_db_url)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
@whole_stack
def api(api_settings):
    from service.api.app import create_app

    served = Served(create_app(api_settings))
    yield served
    served.stop()


@pytest.fixture(scope="session")
@whole_stack
def api_worker(api_env, tmp_path_factory):
    worker = Worker({**os.environ, **api_env, "PYTHONUNBUFFERED": "1"},
                    tmp_path_factory.mktemp("api-worker"), "api")
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def keys(api_db):
    from store.keys import create_key

    return {scope: create_key(api_db, f"test-{scope}", [scope]).key
            for scope in ("read", "write", "admin")}


@pytest.fixture(scope="session")
def client(api, keys):
    with httpx.Client(base_url=api.url, timeout=60,
                      headers={"Authorization": f"Bearer {keys['write']}"}) as c:
        yield c


@pytest.fixture(scope="session")
def anonymous(api):
    with httpx.Client(base_url=api.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
@whole_stack
def hostile_api(api_env, tmp_path_factory):
    """The API in a uvicorn process of its own on the same database and broker as `api`,
    with the production defaults for every bound (the hostile-input suite measures its
    memory and /healthz while attacks run: tests/service/api/test_hostile_*.py)."""
    from tests.support import ApiProcess

    log_dir = tmp_path_factory.mktemp("hostile-api")
    env = {k: v for k, v in api_env.items()
           if k not in ("LATENTBANK_MAX_UPLOAD_BYTES", "LATENTBANK_MAX_REQUEST_BYTES")}
    served = ApiProcess({**env, "LATENTBANK_DATA_DIR": str(log_dir / "data")},
                        log_dir / "api.log")
    yield served
    served.stop()
