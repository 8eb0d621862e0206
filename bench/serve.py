"""Decode throughput over HTTP against onnxruntime called directly on the same file.

Starts pgserver, stores one ready model (an MLP decoder 20-400-784, Bernoulli: MNIST
sized), then serves it with three API processes (uvicorn, one worker each): without
request batching, with it (no delay) and with a 2 ms delay. The load client
(bench/loadgen.py) runs in a process of its own: one client at batch 1, 64 and 256 with
`.npy` and JSON bodies both ways, then 64 concurrent batch-1 clients against each server.
The baseline is one caller running the same `.onnx` file with the same onnxruntime
settings in this process. Client and server share this machine's cores.

Last, the `.npy` decode at batch 256 against its serial bound 1 / (1/floor + 1/direct)
(floor: the bare round trip of the same bytes from an ASGI app that does nothing; direct:
onnxruntime alone), with a lean client and with httpx, beside a framework-free server
running the same session (`minimal_app`), the four taking turns request by request.

    python bench/serve.py [--quick] [--seconds S] [--bound-runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402

from migrations import migrate  # noqa: E402
from service.cli.embedded.postgres import start_embedded_postgres  # noqa: E402
from store.db import Database  # noqa: E402
from store.keys import create_key  # noqa: E402
from store.settings import Settings  # noqa: E402
from tests.support import store_untrained_model  # noqa: E402

MODEL = {"family": "mlp", "latent_dim": 20, "hidden": [400], "likelihood": "bernoulli",
         "input_shape": [784]}


def start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app", "--port",
         str(port), "--log-level", "warning", "--no-access-log"],
        env=env, cwd=ROOT,
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


def echo_app() -> object:
    """A bare ASGI app (uvicorn, same flags as the API) that reads the body and answers
    LATENTBANK_BENCH_ANSWER_BYTES zero bytes: the HTTP round trip with no work, which
    bounds what any server can reach over this loopback."""
    size = int(os.environ.get("LATENTBANK_BENCH_ANSWER_BYTES", "0"))
    answer = bytes(size)

    async def app(scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/x-npy"),
            (b"content-length", str(size).encode())]})
        await send({"type": "http.response.body", "body": answer})

    return app


def minimal_app() -> object:
    """A framework-free decode server (uvicorn, same flags as the API): reads the .npy
    body, runs the decoder at LATENTBANK_BENCH_DECODER on the event loop with the API's
    session settings, answers the .npy. No key, no limits, no checks, no metrics: what a
    Python server of this loop, this client and this model reaches here, the reference
    between the serial bound and the service."""
    import onnxruntime as ort

    from service.api.codecs import load_npy, npy_header
    from service.api.inference import _session_options

    session = ort.InferenceSession(os.environ["LATENTBANK_BENCH_DECODER"],
                                   _session_options(0), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs() if o.name != "logits"]

    async def app(scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        x = session.run(names, {"z": load_npy(b"".join(chunks), "z")})[0]
        head = npy_header(x.dtype, x.shape)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/x-npy"),
            (b"content-length", str(len(head) + x.nbytes).encode())]})
        await send({"type": "http.response.body", "body": head, "more_body": True})
        await send({"type": "http.response.body", "body": memoryview(x.reshape(-1).view(np.uint8))})

    return app


@contextlib.contextmanager
def asgi_server(app: str, extra: dict[str, str]) -> Iterator[int]:
    """One of this file's apps under uvicorn (the API's flags); yields its port."""
    from service.cli.ports import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", f"bench.serve:{app}", "--port",
         str(port), "--log-level", "warning", "--no-access-log"],
        env={**os.environ, **extra}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.post(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load(port: int, key: str, model_id: int, body: str, json_in: bool, clients: int,
         seconds: float, client: str = "lean") -> dict[str, float]:
    """requests/s, p50 and p99 ms of `clients` connections, from a client process
    (bench/loadgen.py's own lean client, or httpx)."""
    kind = "application/json" if json_in else "application/x-npy"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "loadgen.py"), "--port", str(port),
         "--path", f"/v1/models/{model_id}/decode", "--body", body,
         "--header", f"Authorization: Bearer {key}", "--header", f"Content-Type: {kind}",
         "--header", f"Accept: {kind}", "--clients", str(clients), "--seconds", str(seconds),
         "--client", client],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def decoder_session(path: str) -> Any:
    """An onnxruntime session of the file on the CPU, with the server's settings."""
    import onnxruntime as ort

    from service.api.inference import _session_options

    return ort.InferenceSession(path, _session_options(0), providers=["CPUExecutionProvider"])


def direct(path: str, batch: int, seconds: float) -> float:
    """Calls/s of one caller running onnxruntime on the file, with the server's settings."""
    session = decoder_session(path)
    z = np.random.default_rng(1).standard_normal((batch, 20)).astype(np.float32)
    for _ in range(10):
        session.run(None, {"z": z})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, {"z": z})
        n += 1
    return n / (time.perf_counter() - t0)


def old_json_codec(batch: int, seconds: float) -> float:
    """Requests/s of the JSON codec alone as it was before orjson (server: pydantic parse
    of z, tolist + json.dumps of x; client: json.loads of x): the in-run baseline of the
    JSON goal."""
    from service.api.schemas.serving import DecodeRequest

    rng = np.random.default_rng(2)
    body = json.dumps({"z": rng.standard_normal((batch, 20)).astype(np.float32).tolist()})
    x = rng.random((batch, 784), dtype=np.float32)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        np.asarray(DecodeRequest.model_validate_json(body).z, dtype=np.float32)
        json.loads(json.dumps({"x": x.tolist()}, allow_nan=False, separators=(",", ":")))
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--bound-runs", type=int, default=1, metavar="N",
                        help="measure the serial bound N times (the goal is judged on the "
                             "median; each run's figure is printed)")
    args = parser.parse_args()
    seconds = args.seconds or (1.5 if args.quick else 5.0)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        server, url = start_embedded_postgres(Path(tmp) / "pg")
        try:
            migrate(url)
            env = {**os.environ, "LATENTBANK_DATABASE_URL": url,
                   "LATENTBANK_DATA_DIR": os.path.join(tmp, "data"),
                   "LATENTBANK_ARTIFACTS": Path(tmp, "artifacts").as_uri(),
                   "LATENTBANK_REDIS_URL": "redis://127.0.0.1:9/0",
                   # the bench measures the server, not a key's limits: one key, 64 clients
                   "LATENTBANK_RATE_LIMIT_PER_SECOND": "0",
                   "LATENTBANK_MAX_CONCURRENT_PER_KEY": "0"}
            settings = Settings(database_url=url, data_dir=Path(tmp, "data"),
                                artifacts=Path(tmp, "artifacts").as_uri())
            db = Database(url)
            model_id, decoder = store_untrained_model(db, settings, tmp, MODEL)
            key = create_key(db, "bench", ["read"]).key
            db.dispose()
            run(env, tmp, model_id, decoder, key, seconds, max(1, args.bound_runs))
        finally:
            server.cleanup()


def serial_bound(port: int, key: str, model_id: int, decoder: str, body: str,
                 seconds: float) -> dict[str, dict[str, Any]]:
    """Per client, four callers taking turns request by request for `seconds`: onnxruntime
    direct at batch 256 (in this process, the server's session settings), the bare round
    trip of the same bytes (`echo_app`), the framework-free server (`minimal_app`) and the
    served decode, each over its own keep-alive connection. Each one's mean time a call
    gives the bound 1 / (1/floor + 1/direct) = 1 / (t_floor + t_direct) and the shares of
    it. Turns, not cells one after another: this machine's speed drifts by a third (and
    the floor by 2x) between cells seconds apart, which put one round's ratio anywhere in
    0.56-0.99; taking turns puts the four under the same conditions. Each turn takes them
    in a new random order: in a fixed one, a server's work after its answer lands on the
    call that follows it: two API processes, one after the framework-free server and one
    after the other, measured 0.83 and 0.94 of the bound with httpx (0.85 and 0.94 with
    their code swapped); two identical ones in shuffled turns 0.94 and 0.95. The spread
    is each block of 200 turns' share."""
    from bench.loadgen import caller

    session = decoder_session(decoder)
    names = [o.name for o in session.get_outputs() if o.name != "logits"]
    z = np.load(body, allow_pickle=False)
    data = Path(body).read_bytes()
    kinds = ["Content-Type: application/x-npy", "Accept: application/x-npy"]
    runs: dict[str, dict[str, Any]] = {}
    with asgi_server("echo_app", {"LATENTBANK_BENCH_ANSWER_BYTES": "802944"}) as echo, \
            asgi_server("minimal_app", {"LATENTBANK_BENCH_DECODER": decoder}) as minimal:
        for client in ("lean", "httpx"):
            calls = {"direct": lambda: session.run(names, {"z": z}),
                     "floor": caller(client, "127.0.0.1", echo, "/", kinds, data),
                     "minimal": caller(client, "127.0.0.1", minimal, "/", kinds, data),
                     "served": caller(client, "127.0.0.1", port, f"/v1/models/{model_id}/decode",
                                      [*kinds, f"Authorization: Bearer {key}"], data)}
            times: dict[str, list[float]] = {name: [] for name in calls}
            for call in calls.values():  # warm: sessions, connections, caches
                for _ in range(50):
                    call()
            order, rng = list(calls.items()), random.Random(7)
            stop = time.perf_counter() + seconds
            while time.perf_counter() < stop:
                rng.shuffle(order)
                for name, call in order:
                    t0 = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t0)
            runs[client] = paired_shares(times)
    return runs


def paired_shares(times: dict[str, list[float]], block: int = 200) -> dict[str, Any]:
    """Calls/s of each caller, the bound and the shares of it, from the turns' times; the
    served share of each block of `block` turns (all of them when there are fewer)."""
    if not times["served"]:
        raise RuntimeError("no turn ran: give the measurement more seconds")
    mean = {name: float(np.mean(t)) for name, t in times.items()}
    bound = mean["direct"] + mean["floor"]
    n = len(times["served"])
    blocks = [(np.mean(times["direct"][a:a + block]) + np.mean(times["floor"][a:a + block]))
              / np.mean(times["served"][a:a + block])
              for a in range(0, max(1, n - block + 1), block)]
    return {"turns": n, "per_s": {name: 1 / m for name, m in mean.items()},
            "bound": 1 / bound, "share": bound / mean["served"],
            "minimal_share": bound / mean["minimal"],
            "of_minimal": mean["minimal"] / mean["served"],
            "blocks": (float(min(blocks)), float(max(blocks)))}


SERVERS = {"no batching": {"LATENTBANK_DECODE_BATCHING": "false"},
           "batching": {},
           "batching, 2 ms delay": {"LATENTBANK_DECODE_MAX_DELAY_MS": "2"}}


def run(env: dict[str, str], tmp: str, model_id: int, decoder: str, key: str,
        seconds: float, bound_runs: int = 1) -> None:
    from bench.goals import record
    from service.cli.ports import free_port

    ports = {name: free_port() for name in SERVERS}
    procs = [start_api({**env, **extra}, ports[name], Path(tmp, f"api-{i}.log"))
             for i, (name, extra) in enumerate(SERVERS.items())]
    rng = np.random.default_rng(1)
    bodies = {}
    for batch in (1, 64, 256):
        z = rng.standard_normal((batch, 20)).astype(np.float32)
        for kind, data in (("npy", npy(z)), ("json", json.dumps({"z": z.tolist()}).encode())):
            bodies[batch, kind] = os.path.join(tmp, f"z-{batch}.{kind}")
            Path(bodies[batch, kind]).write_bytes(data)
    try:
        rows, cells = [], {}
        for batch in (1, 64, 256):
            base = direct(decoder, batch, seconds)
            for kind in ("npy", "json"):
                cells[batch, kind] = load(ports["batching"], key, model_id,
                                          bodies[batch, kind], kind == "json", 1, seconds)
            rows.append((batch, base, cells[batch, "npy"], cells[batch, "json"]))
        crowd = {name: load(port, key, model_id, bodies[1, "npy"], False, 64, seconds)
                 for name, port in ports.items()}
        old_json = old_json_codec(256, seconds)
        bounds = [serial_bound(ports["batching"], key, model_id, decoder, bodies[256, "npy"],
                               6 * seconds if seconds < 5 else 3 * seconds)
                  for _ in range(bound_runs)]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"\ndecode: onnxruntime direct vs HTTP from a client process, one client "
          f"({seconds:.1f} s a cell, decoder 20-400-784)")
    print(f"{'batch':>5} {'direct/s':>9} {'.npy req/s':>10} {'p50 ms':>7} {'/direct':>7} "
          f"{'JSON req/s':>10} {'p50 ms':>7} {'/direct':>7}")
    for batch, base, n, j in rows:
        print(f"{batch:>5} {base:>9.0f} {n['rps']:>10.0f} {n['p50']:>7.2f} "
              f"{n['rps'] / base:>7.2f} {j['rps']:>10.0f} {j['p50']:>7.2f} "
              f"{j['rps'] / base:>7.2f}")
    print("\n64 concurrent batch-1 clients (.npy)")
    print(f"{'server':<22} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'vs none':>7}")
    for name, c in crowd.items():
        print(f"{name:<22} {c['rps']:>8.0f} {c['p50']:>7.2f} {c['p99']:>7.2f} "
              f"{c['rps'] / crowd['no batching']['rps']:>7.2f}")
    print("\nbatch 256 .npy, one client: the decode against its serial bound "
          "1 / (1/floor + 1/direct): floor = the bare round trip of the same bytes (an ASGI "
          "app that does nothing) with the same client, direct = onnxruntime alone; the four "
          "take turns request by request; minimal = a framework-free server "
          "(bench/serve.py minimal_app) running the same session inline: no key, limits, "
          "checks or metrics")
    print(f"{'run':>3} {'client':<7} {'turns':>6} {'direct/s':>9} {'floor/s':>8} "
          f"{'bound/s':>8} {'minimal/s':>9} {'/bound':>7} {'served/s':>9} {'/bound':>7} "
          f"{'blocks':>11} {'/minimal':>8}")
    shares: dict[str, list[float]] = {}
    for i, measured in enumerate(bounds, 1):
        for client, r in measured.items():
            per_s = r["per_s"]
            print(f"{i:>3} {client:<7} {r['turns']:>6} {per_s['direct']:>9.0f} "
                  f"{per_s['floor']:>8.0f} {r['bound']:>8.0f} {per_s['minimal']:>9.0f} "
                  f"{r['minimal_share']:>7.2f} {per_s['served']:>9.0f} {r['share']:>7.2f} "
                  f"{r['blocks'][0]:>5.2f}-{r['blocks'][1]:<5.2f} {r['of_minimal']:>8.2f}")
            shares.setdefault(client, []).append(r["share"])
    if len(bounds) > 1:
        for client, runs in shares.items():
            print(f"{client}: the service's share of the bound over {len(runs)} runs: median "
                  f"{np.median(runs):.3f}, {min(runs):.3f}-{max(runs):.3f}")
    print(f"JSON codec as it was (batch 256, in this process): {old_json:.1f} req/s; "
          f"JSON over HTTP now {cells[256, 'json']['rps'] / old_json:.1f}x that")
    record("serve: .npy batch 256 / onnxruntime direct", rows[2][2]["rps"] / rows[2][1], 0.7)
    for client, runs in shares.items():  # one run's figure, or the median of several
        record(f"serve: .npy batch 256 / its serial bound ({client} client)",
               float(np.median(runs)), 0.85)
    record("serve: JSON batch 256 / the old JSON codec alone",
           cells[256, "json"]["rps"] / old_json, 10)
    record("serve: batch 1, one client, req/s", cells[1, "npy"]["rps"], 1000)
    record("serve: batch 1, one client, p50", cells[1, "npy"]["p50"], 1.0, "ms", at_most=True)
    # the goals hold for the default settings (batching on, no delay)
    record("serve: 64 clients, batching / no batching",
           crowd["batching"]["rps"] / crowd["no batching"]["rps"], 1.5)
    record("serve: 64 clients, batching, p99", crowd["batching"]["p99"], 50, "ms",
           at_most=True)


if __name__ == "__main__":
    main()
