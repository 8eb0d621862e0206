"""`latentbank up` with the database and the broker on external servers: it starts
neither embedded server, and the stack works on the ones it was given."""

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.support import Up, alive, cli_json, free_port

pytestmark = [pytest.mark.stack, pytest.mark.timeout(600)]


def test_up_uses_the_configured_database_and_broker(new_database, external_redis_url,
                                                    tmp_path):
    db_url = new_database("up")  # empty: `up` migrates it
    up = Up(tmp_path / "data", free_port(), tmp_path / "up.log",
            LATENTBANK_DATABASE_URL=db_url, LATENTBANK_REDIS_URL=external_redis_url)
    try:
        assert "starting PostgreSQL" not in up.log.read_text()
        assert "starting Redis" not in up.log.read_text()
        assert not (tmp_path / "data" / "postgres").exists()
        assert not (tmp_path / "data" / "redis").exists()
        ready = httpx.get(up.url + "/readyz", timeout=10).json()
        assert ready["checks"] == {"database": "ok", "broker": "ok"}
        dataset = cli_json(tmp_path / "data", "datasets", "add", "--builtin", "digits")
        engine = create_engine(db_url)
        with engine.connect() as conn:  # the row is in the database we named
            assert conn.execute(text("SELECT name, n_items FROM datasets")).one() == (
                "digits", dataset["n_items"])
        engine.dispose()
        children = [up.info["api_pid"], up.info["worker_pid"]]
    finally:
        assert up.stop() == 0
    assert not [p for p in children if alive(p)]
