"""Ingest throughput and memory: N generated images (JPEG and PNG, mixed sizes, some
corrupt) registered from a folder, one `.tar` and WebDataset shards through the job path
(an ingest job on a real Celery worker), against the bare decoding rate measured alone
in the same run (the same files decoded with the same ImageSpec in one process, nothing
else), and the worker's peak memory (main process and pool child, sampled).

    python bench/ingest.py [--quick] [--n N]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from celery import Celery  # noqa: E402

from bench.embed import anon_rss, children, redis_url, wait  # noqa: E402
from ingest.images import ImageSpec, decode_image  # noqa: E402
from migrations import migrate  # noqa: E402
from service.cli.commands import worker_argv  # noqa: E402
from service.cli.embedded.postgres import start_embedded_postgres  # noqa: E402
from store.db import Database  # noqa: E402
from store.jobs import get_job  # noqa: E402
from store.publishing import publish  # noqa: E402
from store.settings import Settings  # noqa: E402

CLASSES = 10
SPEC = ImageSpec(color="rgb", size=(32, 32))
CORRUPT_EVERY = 200  # one item in 200 is a truncated file (0.5%)


def image_bytes(i: int, rng: np.random.Generator) -> tuple[str, bytes]:
    """Item i: a class-coloured shape on noise, 24-64 px a side, JPEG (3 in 4) or PNG;
    every CORRUPT_EVERY-th is cut short."""
    from PIL import Image, ImageDraw

    w, h = (int(v) for v in rng.integers(24, 65, size=2))
    base = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    image = Image.fromarray(base)
    c = i % CLASSES
    ImageDraw.Draw(image).ellipse((w // 6, h // 6, w - w // 6, h - h // 6),
                                  fill=(25 * c, 255 - 25 * c, (80 * c) % 256))
    buffer = io.BytesIO()
    ext = "png" if i % 4 == 3 else "jpg"
    image.save(buffer, format="PNG" if ext == "png" else "JPEG", quality=90)
    data = buffer.getvalue()
    if i % CORRUPT_EVERY == CORRUPT_EVERY - 1:
        data = data[:len(data) // 3]
    return ext, data


def generate(tmp: str, n: int) -> tuple[str, str, str, int]:
    """The same N images as a class-folder tree, one .tar of it, and 10 WebDataset shards.
    Returns (folder, tar, shard pattern, total image bytes)."""
    folder, tar_path = f"{tmp}/photos", f"{tmp}/photos.tar"
    shards = 10
    rng = np.random.default_rng(0)
    total = 0
    tars = [tarfile.open(f"{tmp}/shard-{s:06d}.tar", "w")  # noqa: SIM115 - closed below
            for s in range(shards)]
    with tarfile.open(tar_path, "w") as whole:
        for i in range(n):
            ext, data = image_bytes(i, rng)
            total += len(data)
            name = f"class{i % CLASSES}/{i:07d}.{ext}"
            os.makedirs(f"{folder}/class{i % CLASSES}", exist_ok=True)
            with open(f"{folder}/{name}", "wb") as f:
                f.write(data)
            for archive, member, payload in (
                    (whole, name, data), (tars[i * shards // n], f"{i:07d}.{ext}", data),
                    (tars[i * shards // n], f"{i:07d}.cls", str(i % CLASSES).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    for t in tars:
        t.close()
    return folder, tar_path, f"{tmp}/shard-{{000000..{shards - 1:06d}}}.tar", total


def pss_anon(pid: int) -> int:
    """The process's anonymous memory, pages shared with its fork parent counted half in
    each (PSS): summing RssAnon over a prefork worker counts the imports twice."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory(pid: int) -> tuple[int, int]:
    """(RssAnon summed, Pss_Anon summed) over the worker's main process and pool."""
    pids = [pid, *children(pid)]
    return sum(anon_rss(p) for p in pids), sum(pss_anon(p) for p in pids)


def bare_rate(folder: str) -> tuple[float, int]:
    """Items/s of reading and decoding every file alone (this process, one thread)."""
    files = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())
    ok = 0
    t = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            decode_image(data, SPEC)
            ok += 1
        except ValueError:
            pass
    return len(files) / (time.perf_counter() - t), ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="10,000 images")
    parser.add_argument("--n", type=int, default=None)
    args = parser.parse_args()
    n = args.n or (10_000 if args.quick else 100_000)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        t = time.perf_counter()
        folder, tar_path, pattern, total = generate(tmp, n)
        print(f"generated {n} images ({total / (1 << 20):.0f} MiB, JPEG and PNG, 24-64 px, "
              f"{n // CORRUPT_EVERY} truncated) in {time.perf_counter() - t:.0f} s")
        bare, decodable = bare_rate(folder)
        server, db_url = start_embedded_postgres(Path(tmp) / "pg")
        broker, redis_server = redis_url(tmp)
        worker = None
        try:
            migrate(db_url)
            db = Database(db_url)
            data_dir = f"{tmp}/data"
            env = {**os.environ, "LATENTBANK_DATABASE_URL": db_url,
                   "LATENTBANK_REDIS_URL": broker, "LATENTBANK_DATA_DIR": data_dir,
                   "LATENTBANK_ALLOWED_ROOTS": tmp,
                   "LATENTBANK_ARTIFACTS": Path(f"{tmp}/artifacts").as_uri()}
            settings = Settings(data_dir=data_dir, database_url=db_url, redis_url=broker,
                                allowed_roots=[tmp], artifacts=Path(f"{tmp}/artifacts").as_uri())
            log = open(f"{tmp}/worker.log", "w")  # noqa: SIM115
            worker = subprocess.Popen(worker_argv(pool="prefork", loglevel="WARNING"),
                                      env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            client = Celery("bench", broker=broker, backend=broker)
            # A fresh worker's first task pays its imports: a small job first, untimed
            os.makedirs(f"{tmp}/warm/a", exist_ok=True)
            for i in range(20):
                with open(f"{tmp}/warm/a/{i}.jpg", "wb") as f:
                    f.write(image_bytes(i * CORRUPT_EVERY, np.random.default_rng(i))[1])
            warm = submit(db, settings, "warm-up", f"{tmp}/warm")
            publish(db, client, warm)
            wait(db, warm.id)
            idle = memory(worker.pid)
            rows = []
            for label, uri in (("class folders", folder), ("one .tar", tar_path),
                               ("WebDataset, 10 shards", pattern)):
                peak = [0, 0]
                done = threading.Event()

                def sample(done: threading.Event = done, peak: list[int] = peak) -> None:
                    # every 0.5 s: smaps_rollup walks every mapping of a process that
                    # imported torch, and sampling must not take the job's CPU
                    while not done.wait(0.5):
                        rss, pss = memory(worker.pid)
                        peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)

                sampler = threading.Thread(target=sample)
                sampler.start()
                job = submit(db, settings, label, uri)
                publish(db, client, job)
                seconds = wait(db, job.id, poll=0.05)
                done.set()
                sampler.join()
                rows.append((label, n / seconds, tuple(peak), get_job(db, job.id)))
            print(f"\ningest jobs: {n} images to 3x32x32 uint8 (resize + centre crop), "
                  "1 worker process")
            mib = 1 << 20
            print(f"  {'source':34s} {'items/s':>9s} {'/ bare':>7s} {'peak PSS':>9s} "
                  f"{'peak RSS':>9s} {'growth':>7s}  (MiB, anonymous, main + pool)")
            print(f"  {'bare decode alone (this process)':34s} {bare:9.0f}")
            for label, rate, mem, _ in rows:
                print(f"  {label:34s} {rate:9.0f} {rate / bare:7.2f} {mem[1] / mib:9.0f} "
                      f"{mem[0] / mib:9.0f} {(mem[1] - idle[1]) / mib:7.0f}")
            from bench.goals import record

            scale = f"{n // 1000}k"
            for label, rate, mem, _ in rows:
                record(f"ingest: {label}, items/s over {scale} / bare decode", rate / bare, 0.7)
                record(f"ingest: {label}, worker peak memory PSS ({scale})", mem[1] / mib,
                       500, "Mi", at_most=True)
            print(f"  decodable images: {decodable} of {n}; the worker's own memory when "
                  f"idle (after one small job): PSS {idle[1] / mib:.0f} MiB, RSS "
                  f"{idle[0] / mib:.0f} MiB (RSS counts the pages the pool child shares "
                  "with its parent twice)")
            db.dispose()
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=60)
            if redis_server is not None:
                from service.cli.embedded.redis import stop_embedded_redis

                stop_embedded_redis(redis_server)
            server.cleanup()


def submit(db: Database, settings: Settings, label: str, uri: str):
    """An ingest job as the API queues it for a `uri` (options checked the same way)."""
    from ingest.requests import clean_options
    from store.submit import submit_ingest

    options = clean_options({"image_size": list(SPEC.size or ()), "color": SPEC.color,
                             "max_failure_share": 0.02}, settings)
    return submit_ingest(db, f"bench {label}", {"uri": uri, "options": options})[0]


if __name__ == "__main__":
    main()
