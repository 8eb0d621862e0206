"""Decode throughput over HTTP against onnxruntime called directly on the same file.

Starts pgserver, stores one ready model (an MLP decoder 20-400-784, Bernoulli: MNIST
sized), then serves it with two API processes (uvicorn, one worker each): with request
batching and without. Clients (asyncio + httpx, `.npy` bodies both ways) run for a fixed
time at batch 1 and 256 with 1, 8 and 64 concurrent requests. The baseline is one
caller running the same `.onnx` file with the same onnxruntime settings in this process.
Clients and servers share this machine's cores, so ratios here are a lower bound.

    python bench/serve.py [--quick] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402

from migrations import migrate  # noqa: E402
from service.cli.embedded import start_embedded_postgres  # noqa: E402
from store.db import Database  # noqa: E402
from store.keys import create_key  # noqa: E402
from store.settings import Settings, open_artifacts  # noqa: E402
from store.tables import Model  # noqa: E402

MODEL = {"family": "mlp", "latent_dim": 20, "hidden": [400], "likelihood": "bernoulli",
         "input_shape": [784]}


def store_model(db: Database, settings: Settings, tmp: str) -> tuple[int, str]:
    """A dataset, and a ready model whose decoder is exported from a fresh VAE."""
    from models.config import TrainConfig, VAEConfig
    from models.export import export_vae
    from models.vae import VAE
    from service.api.readers import register_file
    from store.artifacts import model_key

    data = os.path.join(tmp, "data.npy")
    np.save(data, np.random.default_rng(0).random((64, 784), dtype=np.float32))
    artifacts = open_artifacts(settings)
    dataset = register_file(db, artifacts, settings, "bench-serve", data).dataset
    config = VAEConfig.from_dict(MODEL)
    files = export_vae(VAE(config), tmp)
    with db.session() as s:
        row = Model(dataset_id=dataset.id, status="ready",
                    config={"model": config.to_dict(), "training": TrainConfig().to_dict()})
        s.add(row)
        s.flush()
        model_id = row.id
    keys = {role: model_key(model_id, 1, f"{role}.onnx") for role in files}
    shas = {role: artifacts.put_file(f.path, keys[role]) for role, f in files.items()}
    with db.session() as s:
        model = s.get(Model, model_id)
        model.encoder_sha256, model.decoder_sha256 = shas["encoder"], shas["decoder"]
        model.encoder_uri = artifacts.uri(keys["encoder"])
        model.decoder_uri = artifacts.uri(keys["decoder"])
    return model_id, files["decoder"].path


def start_api(env: dict[str, str], port: int, batching: bool, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app", "--port",
         str(port), "--log-level", "warning", "--no-access-log"],
        env={**env, "LATENTBANK_DECODE_BATCHING": str(batching).lower()}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # noqa: SIM115
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"API did not start:\n{log.read_text()}")
        time.sleep(0.2)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


async def load(url: str, key: str, model_id: int, batch: int, clients: int,
               seconds: float) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) with `clients` requests in flight for `seconds`."""
    body = npy(np.random.default_rng(1).standard_normal((batch, 20)).astype(np.float32))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-npy",
               "Accept": "application/x-npy"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=60) as client:
        for _ in range(3):  # warm: session loaded, connections open
            (await client.post(f"/v1/models/{model_id}/decode", content=body)).raise_for_status()
        stop = time.perf_counter() + seconds

        async def one_client() -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                answer = await client.post(f"/v1/models/{model_id}/decode", content=body)
                answer.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    ms = 1000 * np.asarray(latencies)
    return len(latencies) / elapsed, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def direct(path: str, batch: int, seconds: float) -> float:
    """Requests/s of one caller running onnxruntime on the file, as the server does."""
    import onnxruntime as ort

    from service.api.inference import _session_options

    session = ort.InferenceSession(path, _session_options(0),
                                   providers=["CPUExecutionProvider"])
    z = np.random.default_rng(1).standard_normal((batch, 20)).astype(np.float32)
    for _ in range(10):
        session.run(None, {"z": z})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, {"z": z})
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args()
    seconds = args.seconds or (1.5 if args.quick else 5.0)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        server, url = start_embedded_postgres(Path(tmp) / "pg")
        try:
            migrate(url)
            env = {**os.environ, "LATENTBANK_DATABASE_URL": url,
                   "LATENTBANK_DATA_DIR": os.path.join(tmp, "data"),
                   "LATENTBANK_ARTIFACTS": Path(tmp, "artifacts").as_uri(),
                   "LATENTBANK_REDIS_URL": "redis://127.0.0.1:9/0"}
            settings = Settings(database_url=url, data_dir=Path(tmp, "data"),
                                artifacts=Path(tmp, "artifacts").as_uri())
            db = Database(url)
            model_id, decoder = store_model(db, settings, tmp)
            key = create_key(db, "bench", ["read"]).key
            db.dispose()
            run(env, tmp, model_id, decoder, key, seconds)
        finally:
            server.cleanup()


def run(env: dict[str, str], tmp: str, model_id: int, decoder: str, key: str,
        seconds: float) -> None:
    from service.cli.stack import free_port

    ports = {True: free_port(), False: free_port()}
    procs = [start_api(env, ports[b], b, Path(tmp, f"api-{b}.log")) for b in (True, False)]
    try:
        rows = []
        for batch in (1, 256):
            base = direct(decoder, batch, seconds)
            rows.append((batch, "-", "onnxruntime direct", base, None, None, 1.0))
            for clients in (1, 8, 64):
                for batching in (True, False):
                    rps, p50, p99 = asyncio.run(load(
                        f"http://127.0.0.1:{ports[batching]}", key, model_id, batch, clients,
                        seconds))
                    rows.append((batch, clients, "HTTP, batching" if batching else
                                 "HTTP, no batching", rps, p50, p99, rps / base))
        print(f"\ndecode over HTTP vs onnxruntime direct ({seconds:.1f} s a cell, "
              f"decoder 20-400-784, .npy bodies)")
        print(f"{'batch':>5} {'clients':>7}  {'server':<20} {'req/s':>9} {'rows/s':>10} "
              f"{'p50 ms':>8} {'p99 ms':>8} {'vs direct':>9}")
        for batch, clients, name, rps, p50, p99, ratio in rows:
            print(f"{batch:>5} {clients!s:>7}  {name:<20} {rps:>9.0f} {rps * batch:>10.0f} "
                  f"{'' if p50 is None else f'{p50:.2f}':>8} "
                  f"{'' if p99 is None else f'{p99:.2f}':>8} {ratio:>9.2f}")
        by = {(r[1], r[2]): r[3] for r in rows if r[0] == 1}
        print(f"\nbatch 1, 64 clients: batching lifts throughput "
              f"{by[(64, 'HTTP, batching')] / by[(64, 'HTTP, no batching')]:.2f}x "
              f"(target > 1); batch 256: best HTTP / direct "
              f"{max(r[6] for r in rows if r[0] == 256 and r[1] != '-'):.2f} (target >= 0.7)")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
