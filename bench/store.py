"""The data layer against the embedded PostgreSQL 18 + pgvector 0.8, in one run:

1. latent writes: `store.latent_rows.latent_writer` rows/s against a raw psycopg binary COPY
   of the same rows (pgvector's psycopg dumper, `write_row` per row);
2. ingest: rows/s and peak memory (a child process, sampled) for an N x 784 `.npy`;
3. kNN over N latents of dimension 32, for latents of a trained VAE (digits, noisy copies,
   encoded) and for random Gaussian vectors: p50/p95 latency and recall@10 of exact search,
   HNSW at several ef_search, and the automatic plan; for the trained latents, label
   filters that 50 %, 10 % and 1 % of the items pass (HNSW iterative scans): p50/p99,
   recall@10 against a NumPy brute force, and answers short of k; the HNSW build with one
   process against the service's plan (memory from the set, workers from the cores); the
   set's partition on disk, and the time deleting the set takes (one DROP of it).

    python bench/store.py [--quick] [--knn-n 1000000] [--ingest-n 1000000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ingest.arrays import register_file  # noqa: E402
from migrations import migrate  # noqa: E402
from service.cli.embedded.postgres import start_embedded_postgres  # noqa: E402
from store.artifacts import ArtifactStore  # noqa: E402
from store.db import Database  # noqa: E402
from store.deletion import delete_set  # noqa: E402
from store.embedding_sets import get_set  # noqa: E402
from store.index_build import plan_build, server_is_local  # noqa: E402
from store.indexes import build_index  # noqa: E402
from store.jobs import claim, finish  # noqa: E402
from store.partitions import partition_sizes  # noqa: E402
from store.search import SearchFilter, nearest, search  # noqa: E402
from store.settings import Settings  # noqa: E402
from store.submit import submit_embedding  # noqa: E402
from tests.store.sets import model_row, write_latents  # noqa: E402


def fake_dataset(db: Database, artifacts: ArtifactStore, settings: Settings, n: int,
                 name: str, tmp: str) -> int:
    path = os.path.join(tmp, f"{name}.npz")
    # 100 labels, one per item in turn: a filter on j labels keeps j % of the items
    np.savez(path, x=np.zeros((n, 1), np.float32), labels=np.arange(n) % 100)
    return register_file(db, artifacts, settings, name, path).dataset.id


def raw_copy(db: Database, set_id: int, dataset_id: int, mu, logvar, elbo, rec, kl,
             log_px) -> None:
    with db.engine.begin() as conn:
        cur = conn.connection.driver_connection.cursor()  # pgvector's types: store.db
        with cur.copy("COPY latents (set_id, item_index, dataset_id, dataset_index, mu, logvar, "
                      "elbo, reconstruction, kl, log_px) FROM STDIN WITH (FORMAT BINARY)"
                      ) as copy:
            copy.set_types(["int8", "int8", "int8", "int8", "vector", "vector", "float8",
                            "float8", "float8", "float8"])
            for i in range(len(mu)):
                copy.write_row((set_id, i, dataset_id, i, mu[i], logvar[i], elbo[i], rec[i],
                                kl[i], log_px[i]))


def bench_writes(db, artifacts, settings, tmp, n: int, dim: int = 32) -> list[tuple]:
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(n, dim)).astype(np.float32)
    logvar = rng.normal(size=(n, dim)).astype(np.float32)
    elbo, rec, kl, log_px = (rng.normal(size=n) for _ in range(4))
    ds = fake_dataset(db, artifacts, settings, n, "bench-writes", tmp)
    mid = model_row(db, ds, dim)
    best = {"raw": np.inf, "ours": np.inf}
    for _ in range(3):
        for name in ("raw", "ours"):
            job = submit_embedding(db, mid, ds)[0]
            claim(db, job.id, "bench", 3600)  # the set is `writing`, as under its job
            set_id = job.embedding_set_id
            t = time.perf_counter()
            if name == "raw":
                raw_copy(db, set_id, ds, mu, logvar, elbo, rec, kl, log_px)
            else:
                write_latents(db, set_id, 0, mu, logvar, elbo, rec, kl, log_px)
            best[name] = min(best[name], time.perf_counter() - t)
            finish(db, job.id, "bench", "succeeded")
            delete_set(db, set_id)  # the row and its partition
    return [("raw psycopg binary COPY (write_row)", n / best["raw"], 1.0),
            ("store.latent_rows.latent_writer", n / best["ours"], best["raw"] / best["ours"])]


INGEST_CHILD = """
import sys
sys.path.insert(0, sys.argv[4])
from store.artifacts import ArtifactStore
from ingest.arrays import register_file
from store.db import Database
from store.settings import Settings
db = Database(sys.argv[1])
reg = register_file(db, ArtifactStore(sys.argv[2]), Settings(), "bench-ingest", sys.argv[3])
print(reg.dataset.n_items)
"""


def rss_parts(pid: int) -> tuple[int, int]:
    anon = file = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) * 1024
    return anon, file


def bench_ingest(db_url: str, artifacts_url: str, tmp: str, n: int) -> dict:
    path = os.path.join(tmp, "ingest.npy")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 784))
    for a in range(0, n, 50_000):
        out[a:a + 50_000] = np.random.default_rng(a).random((min(50_000, n - a), 784),
                                                            dtype=np.float32)
    out.flush()
    del out
    size = os.path.getsize(path)
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", INGEST_CHILD, db_url, artifacts_url, path,
                              ROOT], stdout=subprocess.PIPE, text=True)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                anon, file = rss_parts(child.pid)
            except OSError:
                return
            peak[0], peak[1] = max(peak[0], anon), max(peak[1], anon + file)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, _ = child.communicate()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    os.unlink(path)
    if child.returncode != 0:
        raise SystemExit("ingest child failed")
    return {"n": int(stdout.strip()), "bytes": size, "seconds": seconds, "peak_anon": peak[0],
            "peak_rss": peak[1]}


def trained_latents(n: int, dim: int, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """mu of a VAE trained on digits, for noisy copies of the digits (set and queries)."""
    import torch

    from models.config import TrainConfig, VAEConfig
    from models.data import load_digits_dataset
    from models.trainer import Trainer

    images, _ = load_digits_dataset()
    model = Trainer(VAEConfig(input_shape=(1, 8, 8), latent_dim=dim, hidden=(128, 64)),
                    TrainConfig(epochs=30, batch_size=64, lr=2e-3, importance_samples=0)
                    ).fit(images).model
    rng = np.random.default_rng(1)
    out = np.empty((n + n_queries, dim), np.float32)
    with torch.no_grad():
        for a in range(0, n + n_queries, 100_000):
            b = min(n + n_queries, a + 100_000)
            x = images[rng.integers(0, len(images), b - a)]
            x = np.clip(x + rng.normal(scale=0.15, size=x.shape), 0, 1).astype(np.float32)
            out[a:b] = model.encode(torch.from_numpy(x))[0].numpy()
    return out[:n], out[n:]


def exact_top_k(mu: np.ndarray, queries: np.ndarray, keep: np.ndarray | None = None,
                k: int = 10, chunk: int = 100_000) -> list[set[int]]:
    """Each query's k nearest rows of `mu` (only rows where `keep`) by brute force, all
    queries at once and before any timing: at 10M rows a search timed right after a
    per-query pass over the rows (2.5 GB allocated and freed) took 13 ms against 2.5 ms
    with the same blocks in PostgreSQL's pool (docs/benchmarks). Per chunk of rows,
    float64 distances |x|^2 - 2 x.q + |q|^2 pick k + 10 candidates a query (the margin
    covers the expansion's rounding); the candidates are then ranked by their direct
    squared differences."""
    q64 = queries.astype(np.float64)
    q2 = (q64 ** 2).sum(1)[None, :]
    picked, dists = [], []
    for a in range(0, len(mu), chunk):
        x = mu[a:a + chunk].astype(np.float64)
        d = (x ** 2).sum(1)[:, None] - 2 * x @ q64.T + q2
        if keep is not None:
            d[~keep[a:a + chunk]] = np.inf
        m = min(k + 10, len(x) - 1)
        top = np.argpartition(d, m, axis=0)[:m + 1]
        picked.append(top + a)
        dists.append(np.take_along_axis(d, top, axis=0))
    rows_all, d_all = np.concatenate(picked), np.concatenate(dists)
    out = []
    for j, q in enumerate(q64):
        rows = rows_all[np.isfinite(d_all[:, j]), j]
        exact = ((mu[rows].astype(np.float64) - q) ** 2).sum(1)
        out.append(set(rows[np.argsort(exact, kind="stable")[:k]].tolist()))
    return out


def knn_latents(kind: str, n: int, dim: int, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    if kind == "trained VAE latents":
        return trained_latents(n, dim, n_queries)
    rng = np.random.default_rng(2)
    return (rng.normal(size=(n, dim)).astype(np.float32),
            rng.normal(size=(n_queries, dim)).astype(np.float32))


def bench_knn(db, artifacts, settings, tmp, kind: str, mu: np.ndarray, queries: np.ndarray,
              vector_type: str = "vector"):
    """One set of `mu` stored as `vector_type`: its write, index builds (planned, then one
    process), kNN at each plan against the exact top 10 of the float32 values, filtered
    kNN, sizes and delete."""
    n, dim = mu.shape
    ds = fake_dataset(db, artifacts, settings, n, f"bench-knn-{kind[:6]}-{vector_type}", tmp)
    job, _ = submit_embedding(db, model_row(db, ds, dim), ds, vector_type=vector_type)
    claim(db, job.id, "bench", 3600)  # the set is `writing`, as under an embedding job
    es = get_set(db, job.embedding_set_id)
    zeros = np.zeros(n)
    t = time.perf_counter()
    for a in range(0, n, 100_000):
        write_latents(db, es.id, a, mu[a:a + 100_000], mu[a:a + 100_000], zeros[a:a + 100_000],
                      zeros[a:a + 100_000], zeros[a:a + 100_000])
    write_s = time.perf_counter() - t
    finish(db, job.id, "bench", "succeeded")  # the set is `ready`
    # the build as the service plans it (memory from the set, workers from the cores), then
    # the baseline: the same build with one process (the leader, no parallel worker)
    with db.engine.connect() as conn:
        planned = plan_build(conn, settings, server_is_local(db), n, dim, 16,
                             2 if vector_type == "halfvec" else 4)
    # the plan first, so a cold cache counts against it, not against the baseline
    report = build_index(db, es.id, settings, plan=planned)
    planned_build = get_set(db, es.id).index_build
    single = build_index(db, es.id, settings, plan=replace(planned, workers=0))
    es = get_set(db, es.id)
    truth = exact_top_k(mu, queries)
    rows = []

    def measure(label: str, fn) -> None:
        times, hits = [], 0
        for q, want in zip(queries, truth, strict=True):
            t0 = time.perf_counter()
            got = fn(q)
            times.append(1000 * (time.perf_counter() - t0))
            hits += len(want & set(got))
        rows.append((kind, label, float(np.percentile(times, 50)),
                     float(np.percentile(times, 95)), hits / (10 * len(queries))))

    measure("exact", lambda q: [h.index for h in nearest(db, es, q[None], 10, "l2", None, None)[0]])
    for ef in (40, 100, 200, 400, 640, 1000):
        measure(f"hnsw ef_search={ef}",
                lambda q, ef=ef: [h.index for h in nearest(db, es, q[None], 10, "l2", None, ef)[0]])
    plan = search(db, settings, es.id, vector=queries[0], k=10).plan
    measure(f"auto plan -> {plan}",
            lambda q: [h.index for h in search(db, settings, es.id, vector=q, k=10).hits])
    filtered = bench_filtered(db, settings, es.id, mu, queries) if kind.startswith(
        "trained") else []
    sizes = partition_sizes(db, es.id)
    t = time.perf_counter()
    delete_set(db, es.id)  # the set's partition goes in one DROP
    delete_s = time.perf_counter() - t
    return rows, {"sizes": sizes, "delete_s": delete_s, "filtered": filtered, "kind": kind,
                  "vector_type": vector_type, "auto": rows[-1],
                  "write_s": write_s,
                  "build_s": report.build_seconds, "ef_search": report.ef_search,
                  "single_build_s": single.build_seconds, "build": planned_build,
                  "single_build": single.build,
                  "calibration": report.recall}


def bench_filtered(db, settings, set_id: int, mu: np.ndarray, queries: np.ndarray,
                   ) -> list[dict]:
    """Label filters keeping 50 %, 10 % and 1 % of the items (labels are i % 100), through
    `search` as the API calls it: latency, recall@10 against a NumPy brute force over the
    items that pass, answers short of k, and which plans ran."""
    from collections import Counter

    labels = np.arange(len(mu)) % 100
    out = []
    for share in (50, 10, 1):
        flt = SearchFilter(label=[str(i) for i in range(share)])
        truth = exact_top_k(mu, queries, keep=labels < share)
        times, found, short, plans = [], 0, 0, Counter()
        for q, want in zip(queries, truth, strict=True):
            t0 = time.perf_counter()
            res = search(db, settings, set_id, vector=q, k=10, flt=flt)
            times.append(1000 * (time.perf_counter() - t0))
            found += len(want & {h.index for h in res.hits})
            short += len(res.hits) < 10
            plans[res.plan.split(" (")[0] if "after" not in res.plan else "exact fallback"] += 1
        out.append({"share": share, "p50": float(np.percentile(times, 50)),
                    "p99": float(np.percentile(times, 99)),
                    "recall": found / (10 * len(queries)), "short": short, "plans": plans})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write-n", type=int, default=200_000)
    parser.add_argument("--ingest-n", type=int, default=1_000_000)
    parser.add_argument("--knn-n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--skip", nargs="*", default=[], choices=["writes", "ingest", "knn"])
    parser.add_argument("--kinds", nargs="*", default=["trained", "random"],
                        choices=["trained", "random"], help="which latents the kNN part uses")
    parser.add_argument("--vector-types", nargs="*", default=["vector", "halfvec"],
                        choices=["vector", "halfvec"],
                        help="how the kNN part stores the trained latents (each a set of "
                             "its own, the same values); random latents: vector only")
    args = parser.parse_args()
    if args.quick:
        args.write_n, args.ingest_n, args.knn_n, args.queries = 20_000, 20_000, 30_000, 30
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        server, url = start_embedded_postgres(Path(tmp) / "pg")
        try:
            migrate(url)
            db = Database(url)
            settings = Settings(data_dir=Path(tmp) / "data", exact_search_below=10_000)
            artifacts_url = (Path(tmp) / "artifacts").as_uri()
            artifacts = ArtifactStore(artifacts_url)
            if "writes" not in args.skip:
                print(f"\nlatent writes: {args.write_n} rows of dim 32 (best of 3)")
                print(f"  {'writer':40s} {'rows/s':>10s} {'ratio':>6s}")
                for name, rps, ratio in bench_writes(db, artifacts, settings, tmp, args.write_n):
                    print(f"  {name:40s} {rps:10.0f} {ratio:6.2f}")
            if "ingest" not in args.skip:
                r = bench_ingest(url, artifacts_url, tmp, args.ingest_n)
                mib = 1 << 20
                print(f"\ningest: {r['n']} x 784 float32 .npy ({r['bytes'] / mib:.0f} MiB): "
                      f"{r['seconds']:.1f} s, {r['n'] / r['seconds']:.0f} rows/s, "
                      f"{r['bytes'] / mib / r['seconds']:.0f} MiB/s")
                print(f"  peak anonymous memory {r['peak_anon'] / mib:.0f} MiB "
                      f"({r['peak_anon'] / r['bytes']:.3f} x file); peak RSS with mapped "
                      f"file pages {r['peak_rss'] / mib:.0f} MiB")
            if "knn" not in args.skip:
                print(f"\nkNN, k=10, {args.knn_n} latents of dim 32, {args.queries} queries "
                      "not in the set")
                print(f"  {'latents':22s} {'plan':28s} {'p50 ms':>8s} {'p95 ms':>8s} "
                      f"{'recall@10':>9s}")
                knn_info = []
                runs = [(kind, vt) for kind in ("trained VAE latents", "random Gaussian")
                        if kind.split()[0] in args.kinds
                        for vt in (args.vector_types if kind.startswith("trained")
                                   else ["vector"])]
                latents: dict[str, tuple] = {}
                for kind, vector_type in runs:
                    if kind not in latents:
                        latents = {kind: knn_latents(kind, args.knn_n, 32, args.queries)}
                    rows, info = bench_knn(db, artifacts, settings, tmp, kind, *latents[kind],
                                           vector_type=vector_type)
                    knn_info.append(info)
                    kind = f"{kind} ({vector_type})"
                    for _, label, p50, p95, recall in rows:
                        print(f"  {kind:22s} {label:28s} {p50:8.1f} {p95:8.1f} {recall:9.3f}")
                    for f in info["filtered"]:
                        plans = ", ".join(f"{p} x{n}" for p, n in f["plans"].items())
                        print(f"  {kind:22s} {'label filter, ' + str(f['share']) + ' % pass':28s} "
                              f"{f['p50']:8.1f} {f['p99']:8.1f} {f['recall']:9.3f}  "
                              f"p99; short of k: {f['short']}; plans: {plans}")
                    by_ef = {k: round(v, 3) for k, v in info["calibration"].items()}
                    print(f"  {kind}: write {info['write_s']:.1f} s, HNSW build "
                          f"{info['build_s']:.0f} s, calibrated ef_search={info['ef_search']} "
                          f"(calibration recall by ef: {by_ef})")
                    b, one = info["build"], info["single_build"]
                    print(f"  {kind}: index build, one process {one['seconds']:.1f} s, "
                          f"planned ({b['workers_launched']} parallel worker(s) started + "
                          f"leader) {b['seconds']:.1f} s: "
                          f"{one['seconds'] / max(b['seconds'], 0.1):.2f}x; "
                          f"memory {b['memory_mb']} MiB given, {b['needed_mb']} MiB needed, "
                          f"fitted: {b['fits']}; index {b['index_mb']} MiB on disk")
                    mib = 1 << 20
                    print(f"  {kind}: partition {info['sizes']['table_bytes'] / mib:.0f} MiB "
                          f"of rows ({info['sizes']['table_bytes'] / args.knn_n:.0f} B a row), "
                          f"{info['sizes']['index_bytes'] / mib:.0f} MiB of indexes; "
                          f"deleting the set {info['delete_s']:.2f} s")
                compare_vector_types(knn_info, args.knn_n)
            db.dispose()
            if "knn" not in args.skip:
                record_filtered(knn_info, args.knn_n)
        finally:
            server.cleanup()


def compare_vector_types(infos: list[dict], n: int) -> None:
    """vector against halfvec on the same trained latents, side by side."""
    same = [i for i in infos if i["kind"].startswith("trained")]
    if len(same) < 2:
        return
    print(f"\nvector_type on the same {n} trained latents (dim 32): ratios halfvec / vector")
    print(f"  {'':10s} {'B a row':>8s} {'HNSW MiB':>9s} {'build s':>8s} {'p50 ms':>7s} "
          f"{'recall@10':>9s}  plan")
    for info in same:
        _, plan, p50, _, recall = info["auto"]
        print(f"  {info['vector_type']:10s} {info['sizes']['table_bytes'] / n:8.0f} "
              f"{info['build']['index_mb']:9.0f} {info['build']['seconds']:8.1f} "
              f"{p50:7.2f} {recall:9.3f}  {plan}")
    a, b = (next(i for i in same if i["vector_type"] == t) for t in ("vector", "halfvec"))
    print(f"  ratio      {b['sizes']['table_bytes'] / a['sizes']['table_bytes']:8.2f} "
          f"{b['build']['index_mb'] / max(a['build']['index_mb'], 1):9.2f} "
          f"{b['build']['seconds'] / a['build']['seconds']:8.2f} "
          f"{b['auto'][2] / a['auto'][2]:7.2f}")


def record_filtered(infos: list[dict], n: int) -> None:
    from bench.goals import record

    for info in infos:
        record(f"store: HNSW build over {n} {info['kind']} ({info['vector_type']}), planned "
               "vs one process",
               info["single_build"]["seconds"] / max(info["build"]["seconds"], 0.1), 1.6,
               "x")
    filtered = next(i["filtered"] for i in infos if i["filtered"])
    ten = next(f for f in filtered if f["share"] == 10)
    scale = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"
    record(f"store: filtered kNN over {scale}, 10 % pass, p50", ten["p50"], 20, "ms",
           at_most=True)
    record(f"store: filtered kNN over {scale}, 10 % pass, recall@10", ten["recall"], 0.95)
    record(f"store: filtered kNN over {scale}, answers short of k (50/10/1 %)",
           sum(f["short"] for f in filtered), 0, at_most=True)


if __name__ == "__main__":
    main()
