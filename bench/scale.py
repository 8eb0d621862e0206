"""`bench/scale.py`: one large set of 32-d latents through the data layer, with the figures
of a deployment's first limits, on the embedded PostgreSQL 18 + pgvector 0.8:

- writes: `latent_writer` (shards of 100k rows, binary COPY assembled by numpy) in rows/s,
  against a raw psycopg binary COPY of the same rows in the same run (`write_row`);
- the set's partition and index on disk, and bytes a row;
- the HNSW build as the service plans it (memory from the set, parallel workers from the
  cores), and last the same build with one process;
- kNN k = 10 by the automatic plan, after a CHECKPOINT, in two passes (the first after
  the build and its calibration, the second the steady state): p50 / p99 and recall@10
  against a NumPy brute force over the float32 values; with `--compare-pool`, the same
  again after a restart with PostgreSQL's default 128 MB buffer pool instead of the
  embedded server's (a quarter of the host's memory);
  filtered kNN where 10 % and 1 % of the items pass (HNSW iterative scans): p50 / p99,
  recall@10, answers short of k;
- deleting the set (DETACH + DROP of its partition);
- the peak memory of every process: this one (the writer), and PostgreSQL's (the largest
  backend, parallel workers included, and all of them together), sampled every 0.2 s.

The latents are those of a VAE trained on digits, encoding noisy copies (the structure
of trained latents; bench/store.py's `trained_latents`), stored as `--vector-type`.

    python bench/scale.py [--rows 10000000] [--queries 200] [--vector-type vector]
                          [--compare-pool] [--brute-force-between] [--no-one-process]

10M rows take about 80 minutes on 2 cores (most of it the two index builds; 35 with
`--no-one-process`) and about 3 GiB of memory in this process; `make bench` runs 200k.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sqlalchemy import text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.store import (  # noqa: E402
    bench_filtered,
    exact_top_k,
    fake_dataset,
    raw_copy,
    trained_latents,
)
from migrations import migrate  # noqa: E402
from service.cli.embedded.postgres import postmaster_pid, start_embedded_postgres  # noqa: E402
from store.artifacts import ArtifactStore  # noqa: E402
from store.db import Database  # noqa: E402
from store.deletion import delete_set  # noqa: E402
from store.index_build import plan_build, server_is_local  # noqa: E402
from store.indexes import build_index  # noqa: E402
from store.jobs import claim, finish  # noqa: E402
from store.partitions import partition_name, partition_sizes  # noqa: E402
from store.search import search  # noqa: E402
from store.settings import Settings  # noqa: E402
from store.submit import submit_embedding  # noqa: E402
from tests.store.sets import model_row, write_latents  # noqa: E402

MiB = 1 << 20
SHARD = 100_000


class Peaks:
    """The peak resident memory of this process and of PostgreSQL's processes (the
    postmaster's children: backends, parallel workers), sampled in a thread. The server's
    total counts each process's private pages and the shared pages (the buffer pool, a
    parallel build's graph, the libraries) once, as the largest of its processes maps
    them: the sum of RSS counts the pool in every process that touched it."""

    def __init__(self, postmaster: int) -> None:
        self.postmaster, self.me = postmaster, os.getpid()
        self.writer = self.backend = self.server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        me = psutil.Process(self.me)
        while not self._stop.wait(0.2):
            self.writer = max(self.writer, me.memory_info().rss)
            with contextlib.suppress(psutil.Error):  # restarting (`--compare-pool`)
                postmaster = psutil.Process(self.postmaster)
                infos = []
                for process in [postmaster, *postmaster.children()]:
                    with contextlib.suppress(psutil.Error):  # ended meanwhile
                        infos.append(process.memory_info())
                if not infos:  # the server is restarting (`--compare-pool`)
                    continue
                self.backend = max([self.backend, *(i.rss for i in infos[1:])])
                self.server = max(self.server, sum(i.rss - i.shared for i in infos)
                                  + max(i.shared for i in infos))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class DropTimes(logging.Handler):
    """The data layer's 'partition dropped' log line, while open: the DETACH's and the
    DROP's seconds (store/partitions.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.detach_s = self.drop_s = float("nan")
        self.logger = logging.getLogger("store.partitions")
        self.level_was = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if str(record.msg).startswith("partition dropped"):
                _, self.detach_s, self.drop_s = record.args
        except Exception:  # never the delete's error: the figures stay NaN
            self.handleError(record)

    def close(self) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_was)
        super().close()


def unlink_baseline(where: Path, nbytes: int) -> float:
    """Seconds this file system takes to unlink `nbytes` of written and synced files in
    1 GiB segments, as PostgreSQL keeps a table: what a DROP of that much costs here
    before PostgreSQL does anything (ext4's online discard, where mounted with it, frees
    the blocks then)."""
    folder = where / "unlink-baseline"
    folder.mkdir()
    chunk = bytes(16 * MiB)
    files, left = [], nbytes
    while left > 0:
        size = min(left, 1 << 30)
        path = folder / f"segment.{len(files)}"
        with open(path, "wb") as f:
            for _ in range(size // len(chunk)):
                f.write(chunk)
            f.write(chunk[:size % len(chunk)])
            f.flush()
            os.fsync(f.fileno())
        files.append(path)
        left -= size
    t = time.perf_counter()
    for path in files:
        path.unlink()
    seconds = time.perf_counter() - t
    folder.rmdir()
    return seconds


def checkpoint(server, pgdata: Path) -> None:
    """CHECKPOINT as the superuser: an index build leaves its pages to be written."""
    from service.cli.embedded.postgres import embedded_uri
    from store.db import EMBEDDED_SUPERUSER, make_engine

    engine = make_engine(embedded_uri(server, pgdata, EMBEDDED_SUPERUSER),
                         isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("CHECKPOINT"))
    engine.dispose()


def block_counts(db: Database, set_id: int) -> np.ndarray:
    """The partition's blocks found in the buffer pool and read from outside it (the
    kernel's cache or the disk), its indexes' then its rows': PostgreSQL's cumulative
    statistics, which an idle backend publishes within ten seconds."""
    time.sleep(11)
    with db.engine.connect() as conn:
        row = conn.execute(text(
            "SELECT idx_blks_hit, idx_blks_read, heap_blks_hit, heap_blks_read "
            "FROM pg_statio_user_tables WHERE relid = to_regclass(:n)"),
            {"n": partition_name(set_id)}).first()
    return np.array([int(v or 0) for v in row], dtype=np.int64)


def knn_pass(db: Database, settings: Settings, set_id: int, queries: np.ndarray,
             truth: list[set[int]], mu: np.ndarray | None = None) -> str:
    """Every query once through `search` (k = 10, the automatic plan): p50, p99, recall@10
    against `truth` (the brute force's), the plans, and the blocks a query read, in the
    pool and from outside it. With `mu`, each query is followed by a brute force over it
    (this bench's method until 2026-12-05: its time is not counted)."""
    before = block_counts(db, set_id)
    times, hits, plans = [], 0, set()
    for q, want in zip(queries, truth, strict=True):
        t0 = time.perf_counter()
        res = search(db, settings, set_id, vector=q, k=10)
        times.append(1000 * (time.perf_counter() - t0))
        hits += len(want & {h.index for h in res.hits})
        plans.add(res.plan)
        if mu is not None:
            ((mu - q) ** 2).sum(1).argpartition(10)
    idx_hit, idx_read, heap_hit, heap_read = (block_counts(db, set_id) - before) / len(queries)
    return (f"p50 {np.percentile(times, 50):.1f} ms, p99 {np.percentile(times, 99):.1f} ms, "
            f"recall@10 {hits / (10 * len(queries)):.3f} ({', '.join(sorted(plans))}); "
            f"blocks a query: index {idx_hit:.0f} in the pool + {idx_read:.0f} read, rows "
            f"{heap_hit:.0f} + {heap_read:.0f}")


def restart(server, pgdata: Path, pool_mb: int | None):
    """Stop the server and start it again with `pool_mb` of shared_buffers (None: the
    default); (server, url)."""
    from service.cli.embedded.postgres import stop_embedded_postgres
    from store.settings import get_settings

    stop_embedded_postgres(server, pgdata)
    if pool_mb is None:
        os.environ.pop("LATENTBANK_EMBEDDED_SHARED_BUFFERS_MB", None)
    else:
        os.environ["LATENTBANK_EMBEDDED_SHARED_BUFFERS_MB"] = str(pool_mb)
    get_settings.cache_clear()
    return start_embedded_postgres(pgdata)


def raw_writes(db: Database, settings: Settings, artifacts: ArtifactStore, tmp: str,
               mu: np.ndarray) -> tuple[int, int, float]:
    """(dataset id, model id, raw COPY rows/s): the baseline, the rows by one raw COPY
    into a set of its own (deleted after)."""
    n, dim = mu.shape
    ds = fake_dataset(db, artifacts, settings, n, "scale", tmp)
    model = model_row(db, ds, dim)
    zeros = np.zeros(n)
    job = submit_embedding(db, model, ds)[0]
    claim(db, job.id, "scale", 3600)
    t = time.perf_counter()
    raw_copy(db, job.embedding_set_id, ds, mu, mu, zeros, zeros, zeros, zeros)
    raw_rps = n / (time.perf_counter() - t)
    finish(db, job.id, "scale", "succeeded")
    delete_set(db, job.embedding_set_id)
    return ds, model, raw_rps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--vector-type", default="vector", choices=["vector", "halfvec"])
    parser.add_argument("--compare-pool", action="store_true",
                        help="also search with PostgreSQL's default shared_buffers (128 MB)")
    parser.add_argument("--brute-force-between", action="store_true",
                        help="also time a pass with a NumPy brute force over the set after "
                             "each query (how this bench measured before 2026-12-05)")
    parser.add_argument("--no-one-process", action="store_true",
                        help="leave out the one-process build (its speed-up figure)")
    args = parser.parse_args()
    n = args.rows
    print(f"scale: {n} latents of dim 32 ({args.vector_type}), {args.queries} queries")
    mu, queries = trained_latents(n, 32, args.queries)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        pgdata = Path(tmp) / "pg"
        server, url = start_embedded_postgres(pgdata)
        peaks = Peaks(postmaster_pid(pgdata) or 0)
        try:
            migrate(url)
            db = Database(url)
            settings = Settings(data_dir=Path(tmp) / "data", exact_search_below=10_000)
            artifacts = ArtifactStore((Path(tmp) / "artifacts").as_uri())
            ds, model, raw_rps = raw_writes(db, settings, artifacts, tmp, mu)
            job, _ = submit_embedding(db, model, ds, vector_type=args.vector_type)
            claim(db, job.id, "scale", 24 * 3600)
            zeros = np.zeros(n)
            t = time.perf_counter()
            for a in range(0, n, SHARD):
                b = min(n, a + SHARD)
                write_latents(db, job.embedding_set_id, a, mu[a:b], mu[a:b], zeros[a:b],
                              zeros[a:b], zeros[a:b])
            ours_rps = n / (time.perf_counter() - t)
            finish(db, job.id, "scale", "succeeded")
            set_id = job.embedding_set_id
            print(f"\nwrites: latent_writer {ours_rps:,.0f} rows/s, raw COPY (write_row) "
                  f"{raw_rps:,.0f} rows/s: {ours_rps / raw_rps:.2f}x")
            with db.engine.connect() as conn:
                plan = plan_build(conn, settings, server_is_local(db), n, 32, 16,
                                  2 if args.vector_type == "halfvec" else 4)
                buffers = conn.execute(text("SHOW shared_buffers")).scalar()
            planned = build_index(db, set_id, settings, plan=plan)
            built = planned.build
            print(f"HNSW build as planned: {built['workers_launched']} parallel worker(s) + "
                  f"leader, {built['memory_mb']} MiB given, {built['needed_mb']} needed, "
                  f"fitted {built['fits']}: {built['seconds']:.0f} s (after VACUUM (ANALYZE) "
                  f"of the partition: {built['vacuum_seconds']:.0f} s); calibrated "
                  f"ef_search {planned.ef_search}")
            sizes = partition_sizes(db, set_id)
            print(f"on disk: partition {sizes['table_bytes'] / MiB:,.0f} MiB "
                  f"({sizes['table_bytes'] / n:.0f} B a row), indexes "
                  f"{sizes['index_bytes'] / MiB:,.0f} MiB (HNSW {built['index_mb']} MiB); "
                  f"shared_buffers {buffers}")
            truth = exact_top_k(mu, queries)
            checkpoint(server, pgdata)  # the build's writes, flushed before timing
            for label in ("first pass after the build", "second pass"):
                print(f"kNN k=10, {label}: {knn_pass(db, settings, set_id, queries, truth)}")
            if args.brute_force_between:
                print(f"kNN k=10, each query followed by a brute force over the set: "
                      f"{knn_pass(db, settings, set_id, queries, truth, mu)}")
                print(f"kNN k=10, again without: "
                      f"{knn_pass(db, settings, set_id, queries, truth)}")
            for f in bench_filtered(db, settings, set_id, mu, queries):
                if f["share"] == 50:
                    continue
                plans = ", ".join(f"{p} x{c}" for p, c in f["plans"].items())
                print(f"filtered kNN, {f['share']} % pass: p50 {f['p50']:.1f} ms, p99 "
                      f"{f['p99']:.1f} ms, recall@10 {f['recall']:.3f}, short of k "
                      f"{f['short']} of {len(queries)} ({plans})")
            if args.compare_pool:  # the same searches with PostgreSQL's default pool
                for pool in (128, None):
                    db.dispose()
                    server, url = restart(server, pgdata, pool)
                    peaks.postmaster = postmaster_pid(pgdata) or 0
                    db = Database(url)
                    if pool is None:
                        break
                    for label in ("first pass", "second pass"):
                        print(f"kNN k=10 with shared_buffers 128 MB, {label}: "
                              f"{knn_pass(db, settings, set_id, queries, truth)}")
            if not args.no_one_process:
                one = build_index(db, set_id, settings, plan=replace(plan, workers=0)).build
                print(f"HNSW build in one process: {one['seconds']:.0f} s; as planned "
                      f"{one['seconds'] / max(built['seconds'], 0.1):.2f}x faster")
            drops = DropTimes()
            try:
                t = time.perf_counter()
                delete_set(db, set_id)
                seconds = time.perf_counter() - t
            finally:
                drops.close()
            nbytes = sizes["table_bytes"] + sizes["index_bytes"]
            unlink = unlink_baseline(Path(tmp), nbytes)
            print(f"deleting the set: {seconds:.2f} s (DETACH {drops.detach_s:.2f} s, DROP "
                  f"{drops.drop_s:.2f} s of {nbytes / MiB:,.0f} MiB); the file system "
                  f"unlinking as many bytes of synced files: {unlink:.2f} s; the delete "
                  f"{seconds / max(unlink, 1e-3):.2f}x that")
            db.dispose()
        finally:
            peaks.stop()
            server.cleanup()
        print(f"peak memory: this process {peaks.writer / MiB:,.0f} MiB; PostgreSQL's "
              f"largest process {peaks.backend / MiB:,.0f} MiB, all of them "
              f"{peaks.server / MiB:,.0f} MiB (shared pages counted once; the largest's "
              f"RSS counts the buffer pool and a build's graph)")


if __name__ == "__main__":
    main()
