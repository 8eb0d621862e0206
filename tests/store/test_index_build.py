"""HNSW builds that use the machine, on real PostgreSQL/pgvector: the memory the graph
needs against pgvector's own accounting, the plan (memory and parallel workers) against
hand arithmetic and the server's settings, the build's progress seen on the set while it
runs, and a graph larger than its memory built anyway and said so."""

import logging
import math
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from latentbank_client._embeddings import EmbeddingSet as ClientSet
from latentbank_client._embeddings import build_note
from sqlalchemy import text

from ingest.arrays import register_file
from service.api.schemas.embeddings import EmbeddingSetOut
from store.embedding_sets import get_set
from store.index_build import (
    BuildPlan,
    graph_bytes,
    is_out_of_resources,
    plan_build,
    server_is_local,
)
from store.indexes import build_index, index_name
from store.search import nearest, search
from store.settings import Settings
from tests.store.sets import model_row, ready_set, write_latents

DIM = 32
MiB = 1 << 20


def make_set(db, tmp, name, n, seed):
    """A ready, unindexed set of `n` clustered 32-d latents; returns (set id, mu)."""
    from store.artifacts import ArtifactStore

    settings = Settings(data_dir=tmp / "data")
    artifacts = ArtifactStore((tmp / "artifacts").as_uri())
    np.savez(tmp / f"{name}.npz", x=np.zeros((n, 1), np.float32))
    ds = register_file(db, artifacts, settings, name, str(tmp / f"{name}.npz")).dataset
    model_id = model_row(db, ds.id, DIM)
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(20, DIM))
    mu = (centres[rng.integers(0, 20, n)] + rng.normal(size=(n, DIM))).astype(np.float32)
    zeros = np.zeros(n)

    def write(set_id):
        write_latents(db, set_id, 0, mu, mu, zeros, zeros, zeros)

    return ready_set(db, model_id, ds.id, write), mu


def recall_at_10(db, set_id, mu, n_queries=20):
    """Recall@10 of the set's HNSW index (ef_search 100, its use checked by EXPLAIN)
    against a brute-force numpy search."""
    es = get_set(db, set_id)
    with db.engine.begin() as conn:
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        shown = "\n".join(conn.execute(text(
            f"EXPLAIN SELECT item_index FROM latents WHERE set_id = {set_id} ORDER BY "
            f"mu::vector({DIM}) <-> '[{','.join(['0'] * DIM)}]' LIMIT 10")).scalars())
    assert index_name(set_id) in shown, shown
    rng = np.random.default_rng(1)
    queries = mu[rng.choice(len(mu), n_queries, replace=False)] + rng.normal(
        scale=0.3, size=(n_queries, DIM)).astype(np.float32)
    found = []
    for q, hits in zip(queries, nearest(db, es, queries, 10, "l2", None, 100), strict=True):
        truth = np.argsort(((mu.astype(np.float64) - q) ** 2).sum(1), kind="stable")[:10]
        found.append(len({h.index for h in hits} & set(truth.tolist())) / 10)
    return float(np.mean(found))


def test_the_graph_estimate_matches_pgvectors_own_accounting_and_a_spilled_build_says_so(
        db, tmp_path, caplog):
    """With 1 MiB of memory pgvector stops adding to the in-memory graph after as many
    tuples as fit, and says how many; the estimate per element must agree within 3 %. The
    build goes on (on disk), the index works, and the set, its API schema, the client and
    the log all say the graph did not fit."""
    settings = Settings(data_dir=tmp_path / "data", exact_search_below=1000)
    set_id, mu = make_set(db, tmp_path, "spill", 4000, seed=2)
    tiny = BuildPlan(workers=0, memory_mb=1, needed_mb=math.ceil(
        graph_bytes(4000, DIM, 16) / MiB))  # the plan predicts the spill: 4 MiB needed
    with caplog.at_level(logging.WARNING, logger="store.index_build"):
        report = build_index(db, set_id, settings, plan=tiny)
    es = get_set(db, set_id)
    assert es.index_status == "ready" and report.status == "ready"
    build = es.index_build
    assert build["fits"] is False and build["phase"] == "done" and build["memory_mb"] == 1
    assert build["predicted_fits"] is False and build["workers_launched"] == 0
    per_element = 200 + 4 * DIM + 2 * 16 * 16  # the estimate, written out by hand
    assert graph_bytes(1, DIM, 16) == per_element
    assert abs(build["spilled_after"] - MiB / per_element) <= 0.03 * MiB / per_element
    assert any("LATENTBANK_INDEX_BUILD_MAX_MEMORY_MB" in r.getMessage() for r in caplog.records)
    assert recall_at_10(db, set_id, mu) >= 0.9
    shown = EmbeddingSetOut.of(es).model_dump()["index_build"]
    assert shown["fits"] is False and shown["spilled_after"] == build["spilled_after"]
    assert build_note("ready", shown) == ", graph did not fit in memory"
    running = {"phase": "building index: loading tuples", "fraction": 0.4512}
    assert build_note("building", running) == ", 45 % (building index: loading tuples)"
    assert "graph did not fit" in ClientSet(id=set_id, index_status="ready",
                                            index_build=shown)._repr_html_()


@pytest.mark.slow
def test_a_parallel_build_reports_its_progress_on_the_set_and_keeps_its_figures(
        db, tmp_path):
    n = 30_000
    settings = Settings(data_dir=tmp_path / "data", exact_search_below=1000)
    set_id, mu = make_set(db, tmp_path, "progress", n, seed=3)
    plan = BuildPlan(workers=1, memory_mb=256, needed_mb=math.ceil(graph_bytes(n, DIM, 16)
                                                                   / MiB))
    seen, report = [], {}
    builder = threading.Thread(target=lambda: report.update(
        r=build_index(db, set_id, settings, plan=plan, progress_interval=0.1)))
    builder.start()
    while builder.is_alive():
        es = get_set(db, set_id)
        if es.index_status == "building" and es.index_build:
            seen.append(es.index_build)
        time.sleep(0.05)
    builder.join()
    loading = [b for b in seen if b["phase"].startswith("building index")]
    # (before the build, the partition's VACUUM: its phase alone)
    assert max(b.get("workers_launched", 0) for b in seen) == 1  # PostgreSQL started it
    assert any(0 < b["fraction"] < 1 for b in loading), seen
    for b in loading:  # the share is the tuples loaded over the set's items
        assert b["fraction"] == pytest.approx(min(1.0, b["tuples_done"] / n), abs=1e-4)
        assert b["workers"] == 1 and b["memory_mb"] == 256
    fractions = [b["fraction"] for b in loading]
    assert fractions == sorted(fractions)
    es = get_set(db, set_id)
    assert es.index_status == "ready"
    build = es.index_build
    assert build["phase"] == "done" and build["fraction"] == 1.0 and build["fits"] is True
    assert build["spilled_after"] is None and build["workers"] == 1
    assert build["workers_launched"] == 1 and build["predicted_fits"] is True
    with db.engine.connect() as conn:
        size = conn.execute(text(f"SELECT pg_relation_size('{index_name(set_id)}')")).scalar()
    assert build["index_mb"] == round(size / MiB, 1)
    assert recall_at_10(db, set_id, mu) >= 0.9
    # a later build starts from nothing: the set's record is the new build's
    build_index(db, set_id, settings, plan=BuildPlan(0, 64, plan.needed_mb))
    assert get_set(db, set_id).index_build["workers"] == 0


def test_the_build_vacuums_the_partition_before_it_builds_and_records_it(
        db, tmp_path, monkeypatch):
    import store.indexes

    set_id, _ = make_set(db, tmp_path, "vacuumed", 3000, seed=5)
    partition, seen = f"latents_set_{set_id}", []
    analyze = store.indexes.analyze

    def watched(db_, table, vacuum=False):  # what the set and the catalogue say meanwhile
        with db.engine.connect() as conn:
            seen.append((table, vacuum, get_set(db, set_id).index_build, conn.execute(text(
                "SELECT count(*) FROM pg_indexes WHERE indexname = :i"),
                {"i": index_name(set_id)}).scalar_one()))
        analyze(db_, table, vacuum)

    monkeypatch.setattr(store.indexes, "analyze", watched)
    build_index(db, set_id, Settings(data_dir=tmp_path / "data", exact_search_below=1000),
                plan=BuildPlan(0, 64, 8), calibration_queries=5)
    # one VACUUM (ANALYZE), before the index exists, its phase on the set meanwhile
    assert seen == [(partition, True, {"phase": "vacuuming the new rows", "fraction": 0.0},
                     0)]
    with db.engine.connect() as conn:
        # last_vacuum is a VACUUM command's, never autovacuum's (last_autovacuum)
        vacuumed = conn.execute(text(
            "SELECT last_vacuum FROM pg_stat_user_tables WHERE relname = :t"),
            {"t": partition}).scalar_one()
        pages, visible = conn.execute(text(
            "SELECT relpages, relallvisible FROM pg_class WHERE relname = :t"),
            {"t": partition}).one()
    assert vacuumed is not None
    assert pages > 0 and visible == pages  # every page in the visibility map
    build = get_set(db, set_id).index_build
    assert build["phase"] == "done" and build["vacuum_seconds"] >= 0


def test_a_vacuum_that_fails_marks_the_index_failed_and_a_later_build_succeeds(
        db, tmp_path, monkeypatch):
    """The vacuum before a build fails like the build itself: the set says `failed` with
    the server's words (searches stay exact), never `building` forever."""
    import sqlalchemy.exc

    import store.indexes

    set_id, mu = make_set(db, tmp_path, "vacuum fails", 3000, seed=6)
    analyze = store.indexes.analyze

    def refused(db_, table, vacuum=False):  # the server's own error for a bad VACUUM
        with db_.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"VACUUM (NO_SUCH_OPTION) {table}"))

    settings = Settings(data_dir=tmp_path / "data", exact_search_below=1000)
    monkeypatch.setattr(store.indexes, "analyze", refused)
    with pytest.raises(sqlalchemy.exc.ProgrammingError):
        build_index(db, set_id, settings, plan=BuildPlan(0, 64, 8), calibration_queries=5)
    es = get_set(db, set_id)
    assert es.index_status == "failed" and "no_such_option" in es.index_error
    got = search(db, settings, set_id, vector=mu[0], k=10)
    truth = np.argsort(((mu.astype(np.float64) - mu[0]) ** 2).sum(1), kind="stable")[:10]
    assert {h.index for h in got.hits} == set(truth.tolist()) and "exact" in got.plan
    monkeypatch.setattr(store.indexes, "analyze", analyze)
    build_index(db, set_id, settings, plan=BuildPlan(0, 64, 8), calibration_queries=5)
    assert get_set(db, set_id).index_status == "ready"


def test_the_plan_sizes_memory_from_the_set_and_workers_from_the_server(db, monkeypatch):
    monkeypatch.setattr("store.index_build.local_cores", lambda: 16)
    monkeypatch.setattr("store.index_build.shared_memory_mb", lambda: 12_000)
    for name in ("LATENTBANK_INDEX_BUILD_WORKERS", "LATENTBANK_INDEX_BUILD_MAX_MEMORY_MB"):
        monkeypatch.delenv(name, raising=False)
    with db.engine.connect() as conn:
        conn.execute(text("SET max_parallel_maintenance_workers = 0"))  # a pooled session's
        max_parallel = int(conn.execute(text("SHOW max_parallel_workers")).scalar())
        server_default = int(conn.execute(text(
            "SELECT reset_val FROM pg_settings WHERE name = 'max_parallel_maintenance_workers'"
        )).scalar())
        assert server_default == 2  # PostgreSQL's default, not this session's 0
        # 1M items of 32-d at m = 16: 1e6 x (200 + 128 + 512) bytes = 801.1 MiB -> 802
        plan = plan_build(conn, Settings(index_build_max_memory_mb=4096), True,
                          1_000_000, 32, 16)
        assert (plan.needed_mb, plan.memory_mb, plan.fits) == (802, 883, True)
        capped = plan_build(conn, Settings(index_build_max_memory_mb=500), True,
                            1_000_000, 32, 16)
        assert (capped.memory_mb, capped.fits) == (500, False)
        # halfvec halves the vector's part: 1e6 x (200 + 64 + 512) = 740.1 MiB -> 741
        assert plan_build(conn, Settings(), True, 1_000_000, 32, 16, 2).needed_mb == 741
        assert plan_build(conn, Settings(), True, 100, 32, 16).memory_mb == 64  # the floor
        remote = plan_build(conn, Settings(), False, 10_000_000, 32, 16)
        assert remote.memory_mb == 1024 and not remote.fits  # 8,011 MiB needed
        # workers: the setting, capped by the server and by 32 MB a process (PostgreSQL
        # starts no more); else half this host's cores; else (remote) the server's default
        big = 2_000_000  # 1,603 MiB needed: memory for 49 processes
        assert plan_build(conn, Settings(index_build_workers=3), False, big, 32,
                          16).workers == 3
        assert plan_build(conn, Settings(index_build_workers=64), True, big, 32,
                          16).workers == min(64, max_parallel)
        assert plan_build(conn, Settings(index_build_workers=3), True, 10, 2,
                          16).workers == 1  # 64 MiB: the leader and one worker
        assert plan_build(conn, Settings(), True, big, 32, 16).workers == min(max_parallel, 8)
        assert plan_build(conn, Settings(), False, big, 32, 16).workers == 2
        monkeypatch.setattr("store.index_build.shared_memory_mb", lambda: 64)  # Docker's
        assert plan_build(conn, Settings(), True, big, 32, 16).workers == 0


@pytest.mark.parametrize(("url", "local"), [
    ("postgresql+psycopg://u@/db?host=/tmp/pg", True),  # the embedded server's socket
    ("postgresql+psycopg://u@127.0.0.1:5432/db", True), ("postgresql+psycopg://u@localhost/db",
                                                          True),
    ("postgresql+psycopg://u@postgres:5432/db", False), ("postgresql+psycopg://u@10.0.0.5/db",
                                                         False),
    ("postgresql+psycopg://u@/db?host=db.example.com", False),  # a host in the query
])
def test_a_server_is_local_on_a_socket_or_loopback(url, local, monkeypatch):
    from sqlalchemy.engine import make_url

    monkeypatch.delenv("PGHOST", raising=False)
    fake = SimpleNamespace(engine=SimpleNamespace(url=make_url(url)))
    assert server_is_local(fake) is local


def test_a_parallel_build_short_of_shared_memory_is_told_apart():
    """The error a parallel build gets from a small /dev/shm (as pgvector users report it
    from containers) sends the build again with one process; other errors do not."""
    full = Exception('could not resize shared memory segment "/PostgreSQL.2892504480" to '
                     "16774205952 bytes: No space left on device")
    assert is_out_of_resources(SimpleNamespace(orig=full))
    assert is_out_of_resources(SimpleNamespace(orig=SimpleNamespace(sqlstate="53200")))
    assert not is_out_of_resources(SimpleNamespace(orig=SimpleNamespace(sqlstate="57P01")))
    assert not is_out_of_resources(Exception("could not extend file: No space left"))


def test_a_parallel_build_refused_its_memory_is_built_again_with_one_process(
        db, tmp_path, monkeypatch, caplog):
    """The server refuses a parallel build its shared memory (what a 64 MB /dev/shm does
    to a container's PostgreSQL): the invalid index is dropped, the build runs again with
    one process, and the set records that."""
    from sqlalchemy.exc import OperationalError

    import store.indexes as indexes

    settings = Settings(data_dir=tmp_path / "data", exact_search_below=1000)
    set_id, mu = make_set(db, tmp_path, "shm", 3000, seed=4)
    real = indexes.IndexWatch

    class RefusedWhenParallel(real):
        def __enter__(self):
            watch = super().__enter__()
            if self.plan.workers > 0:
                super().__exit__(None, None, None)
                raise OperationalError("CREATE INDEX", {}, Exception(
                    'could not resize shared memory segment "/PostgreSQL.1" to 70254592 '
                    "bytes: No space left on device"))
            return watch

    monkeypatch.setattr(indexes, "IndexWatch", RefusedWhenParallel)
    with caplog.at_level(logging.WARNING, logger="store.indexes"):
        report = build_index(db, set_id, settings, plan=BuildPlan(1, 64, 3))
    assert report.status == "ready" and get_set(db, set_id).index_status == "ready"
    assert get_set(db, set_id).index_build["workers"] == 0
    assert any("building with one process" in r.getMessage() for r in caplog.records)
    assert recall_at_10(db, set_id, mu) >= 0.9


@pytest.mark.parametrize(("column", "dim", "m"), [("vector", 8, 8), ("vector", 128, 32),
                                                  ("halfvec", 32, 16)])
def test_the_graph_estimate_holds_across_sizes_and_types(db, column, dim, m):
    """pgvector's own count of the tuples that fit in 1 MiB, on a table of its own, against
    the estimate: within 3 % over dimensions, links per layer and half-precision vectors."""
    rng = np.random.default_rng(dim)
    values = rng.normal(size=(2500, dim)).astype(np.float32)
    notices = []
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        raw = conn.connection.driver_connection
        def hear(diag):
            notices.append(diag.message_primary)

        raw.add_notice_handler(hear)
        try:
            conn.execute(text(f"CREATE TEMP TABLE g (v {column}({dim}))"))
            conn.execute(text(f"INSERT INTO g SELECT unnest(CAST(:v AS {column}[]))"),
                         {"v": ["[" + ",".join(f"{x:.4f}" for x in row) + "]"
                                for row in values]})
            conn.execute(text("SET maintenance_work_mem = '1MB'"))
            conn.execute(text("SET client_min_messages = notice"))
            conn.execute(text(f"CREATE INDEX ON g USING hnsw (v {column}_l2_ops) "
                              f"WITH (m = {m})"))
        finally:
            conn.execute(text("DROP TABLE IF EXISTS g"))
            conn.execute(text("RESET maintenance_work_mem"))
            conn.execute(text("RESET client_min_messages"))
            raw.remove_notice_handler(hear)
    counted = [int(n.split()[-2]) for n in notices if "no longer fits" in n]
    value_bytes = 2 if column == "halfvec" else 4
    estimate = MiB / graph_bytes(1, dim, m, value_bytes)
    assert counted and abs(counted[0] - estimate) <= 0.03 * estimate, (counted, estimate)
