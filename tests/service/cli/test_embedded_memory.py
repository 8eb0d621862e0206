"""The embedded PostgreSQL's buffer pool is sized for the host (a quarter of its memory,
at least 128 MiB, at most 8 GiB) or by LATENTBANK_EMBEDDED_SHARED_BUFFERS_MB, applied each
time latentbank starts the stopped folder: a set's HNSW graph that fits in it is searched
from the pool, not through the kernel's page cache."""

import psycopg
import pytest

import store.index_build
from service.cli.embedded.errors import EmbeddedError
from service.cli.embedded.postgres import (
    shared_buffers_mb,
    start_embedded_postgres,
    stop_embedded_postgres,
)
from store.settings import get_settings

pytestmark = pytest.mark.timeout(180)


def pool_mb(url: str) -> int:
    """shared_buffers as the running server has it, in MiB (pg_settings counts 8 kB pages)."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        pages, unit = conn.execute("SELECT setting::bigint, unit FROM pg_settings "
                                   "WHERE name = 'shared_buffers'").fetchone()
    assert unit == "8kB"
    return pages * 8 // 1024


@pytest.fixture
def host(monkeypatch):
    """Set the host's memory (MiB) the service sees, and the setting."""
    def make(memory_mb, setting=None):
        monkeypatch.setattr(store.index_build, "local_memory_mb", lambda: memory_mb)
        if setting is None:
            monkeypatch.delenv("LATENTBANK_EMBEDDED_SHARED_BUFFERS_MB", raising=False)
        else:
            monkeypatch.setenv("LATENTBANK_EMBEDDED_SHARED_BUFFERS_MB", str(setting))
        get_settings.cache_clear()
    yield make
    get_settings.cache_clear()


@pytest.mark.parametrize(("memory_mb", "pool"), [
    (256, 128), (512, 128), (640, 160), (8192, 2048), (24_000, 6000), (32_768, 8192),
    (1_000_000, 8192)])
def test_a_quarter_of_the_host_between_128_mib_and_8_gib(host, memory_mb, pool):
    host(memory_mb)
    assert shared_buffers_mb() == pool


def test_the_setting_wins_and_more_than_the_host_or_below_16_mib_is_refused(host, tmp_path):
    host(1024, 700)
    assert shared_buffers_mb() == 700
    host(1024, 2048)
    with pytest.raises(EmbeddedError, match="more than this host's memory"):
        start_embedded_postgres(tmp_path / "postgres")
    host(1024, 8)
    with pytest.raises(ValueError, match="embedded_shared_buffers_mb"):
        start_embedded_postgres(tmp_path / "postgres")
    assert not (tmp_path / "postgres").exists(), "refused before anything was made"


def test_the_pool_is_set_at_each_start_of_the_stopped_folder(host, tmp_path):
    folder = tmp_path / "postgres"
    host(1024)
    server, url = start_embedded_postgres(folder)
    try:
        assert pool_mb(url) == 256
    finally:
        stop_embedded_postgres(server, folder)
    host(1024, 48)
    server, url = start_embedded_postgres(folder)  # the same folder, started again
    try:
        assert pool_mb(url) == 48
        conf = (folder / "postgresql.conf").read_text()
        assert conf.count("include_if_exists = 'latentbank.conf'") == 1, "added once"
        assert oct((folder / "latentbank.conf").stat().st_mode & 0o777) == oct(
            (folder / "postgresql.conf").stat().st_mode & 0o777)
        assert not list(folder.glob(".latentbank.conf.*")), "no temporary file left"
    finally:
        stop_embedded_postgres(server, folder)
