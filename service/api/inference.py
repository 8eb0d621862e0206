"""onnxruntime sessions for the models' encoders and decoders, cached per model version and
run off the event loop, and the batching of concurrent requests for one model
(docs/internals/serving.md)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from store.artifacts import ArtifactStore
from store.errors import Conflict, NotFound


@dataclass
class Loaded:
    session: ort.InferenceSession
    input_name: str
    output_names: list[str]
    meta: dict[str, str]


def _session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    # Threads that spin between calls would steal the cores from the HTTP workers.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, always with the CPU fallback."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class SessionCache:
    """At most `capacity` sessions, least recently used dropped first."""

    def __init__(self, artifacts: ArtifactStore, cache_dir: str, capacity: int,
                 threads: int = 0) -> None:
        self.artifacts, self.cache_dir = artifacts, cache_dir
        self.capacity, self.threads = max(1, capacity), threads
        self._sessions: OrderedDict[tuple[int, str, str], Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def local_file(self, model_id: int, role: str, sha256: str, uri: str) -> str:
        """The verified .onnx file at `uri` (the model row's) on local disk (downloaded
        once from remote stores)."""
        key = self.artifacts.key_of(uri)
        local = self.artifacts.local_path(key)
        if local is not None:
            if not os.path.exists(local):  # deleted with its model (a replica may not know)
                raise NotFound(f"model {model_id} has no {role} file in the artifact store "
                               "(the model was deleted)")
            return local
        os.makedirs(self.cache_dir, exist_ok=True)
        path = os.path.join(self.cache_dir, f"model-{model_id}-{role}-{sha256[:16]}.onnx")
        if not os.path.exists(path):
            self.artifacts.get_file(key, path, sha256=sha256)  # whole or not at all
        return path

    def cached(self, model_id: int, role: str, sha256: str) -> Loaded | None:
        with self._lock:
            loaded = self._sessions.get((model_id, role, sha256))
            if loaded is not None:
                self._sessions.move_to_end((model_id, role, sha256))
            return loaded

    def forget(self, model_id: int) -> None:
        """Drop a deleted model's sessions and its downloaded files."""
        with self._lock:
            for key in [k for k in self._sessions if k[0] == model_id]:
                del self._sessions[key]
        if os.path.isdir(self.cache_dir):
            for name in os.listdir(self.cache_dir):
                if name.startswith(f"model-{int(model_id)}-") and name.endswith(".onnx"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(self.cache_dir, name))

    def get(self, model_id: int, role: str, sha256: str | None, uri: str | None) -> Loaded:
        if not sha256 or not uri:
            raise Conflict(f"model {model_id} has no {role} yet")
        cache_key = (model_id, role, sha256)
        with self._lock:
            loaded = self._sessions.get(cache_key)
            if loaded is not None:
                self._sessions.move_to_end(cache_key)
                return loaded
        path = self.local_file(model_id, role, sha256, uri)
        session = ort.InferenceSession(path, _session_options(self.threads),
                                       providers=providers())
        meta = dict(session.get_modelmeta().custom_metadata_map)
        loaded = Loaded(session, session.get_inputs()[0].name,
                        [o.name for o in session.get_outputs()], meta)
        with self._lock:
            self._sessions[cache_key] = loaded
            self._sessions.move_to_end(cache_key)
            while len(self._sessions) > self.capacity:
                self._sessions.popitem(last=False)
        return loaded


@dataclass
class BatchPolicy:
    """Triton-style dynamic batching of one model's calls: a call waits at most
    `max_delay_s` for others to join it, and one onnxruntime call takes at most
    `max_rows` rows (a single larger request still runs, alone). While a batch runs, new
    calls queue for the next one, so with no delay a lone caller is never held back.

    A lone call (no other request joined it after one turn of the event loop) whose
    onnxruntime time, estimated from the model's recent calls, is under `inline_max_s`
    runs on the event loop itself: the hand-off to a worker thread and back costs more
    than such a call's own compute leaves for other requests (docs/internals/serving.md).
    """

    max_rows: int = 1024
    max_delay_s: float = 0.0
    enabled: bool = True
    inline_max_s: float = 0.0


class Busy:
    """onnxruntime calls running in this process, in any thread: each session may take
    every core, so a lone call runs on the event loop only while none is."""

    def __init__(self) -> None:
        self._calls = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Busy:
        with self._lock:
            self._calls += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._calls -= 1

    @property
    def idle(self) -> bool:
        return self._calls == 0


class Observer:
    """Where a model's queue reports: rows per onnxruntime call, each request's wait in
    the queue, and each request's queue-plus-call time."""

    def batch(self, rows: int) -> None: ...

    def waited(self, seconds: float) -> None: ...

    def served(self, seconds: float) -> None: ...


class Batcher:
    """One model's queue: merges concurrent calls of `run(rows) -> outputs` (row-aligned
    arrays) into single calls, by `policy`; each caller gets its own rows' outputs."""

    def __init__(self, run: Callable[[np.ndarray], list[np.ndarray]],
                 executor: ThreadPoolExecutor, policy: BatchPolicy,
                 observer: Observer | None = None, busy: Busy | None = None,
                 inline: bool = True) -> None:
        self.run, self.executor, self.policy = run, executor, policy
        # the process's onnxruntime calls in flight, and whether this session may run on
        # the loop at all (CPU only: a CUDA call's first run at a new shape searches
        # for its kernels, far beyond any estimate)
        self.busy, self.inline = busy or Busy(), inline
        self.observer: Any = observer or Observer()
        self._pending: deque[tuple[np.ndarray, asyncio.Future[list[np.ndarray]], float]] = (
            deque())
        self._rows = 0  # rows queued
        self._draining = False
        self._full: asyncio.Event | None = None  # set when a delayed batch fills up
        self._task: asyncio.Task[None] | None = None
        # seconds per row of recent calls, by row count's power of two (1, 2-3, 4-7, ...):
        # a call's fixed cost weighs on small ones, so sizes are not mixed
        self.per_row: dict[int, float] = {}

    def learn(self, rows: int, seconds: float) -> None:
        """Count a call of `rows` rows that took `seconds` into the estimate."""
        size, per_row = max(1, rows).bit_length(), seconds / max(1, rows)
        last = self.per_row.get(size)
        self.per_row[size] = per_row if last is None else 0.8 * last + 0.2 * per_row

    def _timed(self, rows: np.ndarray) -> list[np.ndarray]:
        with self.busy:
            started = time.perf_counter()
            outputs = self.run(rows)
            seconds = time.perf_counter() - started
        self.learn(len(rows), seconds)
        return outputs

    def _short(self, rows: int) -> bool:
        """Whether a call of `rows` rows may run on the loop: a CPU session, no delay
        policy, no other onnxruntime call running in this process, and calls of this
        size so far well under inline_max_s (no estimate for the size: no)."""
        per_row = self.per_row.get(max(1, rows).bit_length())
        return (self.inline and per_row is not None and self.policy.max_delay_s <= 0
                and self.busy.idle and per_row * rows < self.policy.inline_max_s)

    async def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        if not self.policy.enabled:
            self.observer.batch(len(rows))
            self.observer.waited(0.0)
            return await loop.run_in_executor(self.executor, self._timed, rows)
        future: asyncio.Future[list[np.ndarray]] = loop.create_future()
        self._pending.append((rows, future, loop.time()))
        self._rows += len(rows)
        if not self._draining:
            self._draining = True
            if self._short(len(rows)):
                try:  # one turn of the loop: requests already under way join the queue
                    await asyncio.sleep(0)
                except BaseException:  # cancelled: the queue is not left without a drain
                    future.cancel()  # and the drain skips these rows
                    self._task = loop.create_task(self._drain())
                    raise
                if len(self._pending) == 1 and self._short(len(rows)):  # alone, still idle
                    self._pending.popleft()
                    self._rows -= len(rows)
                    self._draining = False
                    self.observer.batch(len(rows))
                    self.observer.waited(0.0)
                    return self._timed(rows)
            self._task = loop.create_task(self._drain())
        elif self._full is not None and self._rows >= self.policy.max_rows:
            self._full.set()
        return await future

    async def _wait_for_company(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hold the head of the queue until it is `max_delay_s` old or the batch is full."""
        wait = self._pending[0][2] + self.policy.max_delay_s - loop.time()
        if wait <= 0 or self._rows >= self.policy.max_rows:
            return
        self._full = asyncio.Event()
        timer = loop.call_later(wait, self._full.set)
        try:
            await self._full.wait()
        finally:
            timer.cancel()
            self._full = None

    def _take(self, now: float) -> tuple[list[tuple[np.ndarray, asyncio.Future[Any]]], int]:
        batch: list[tuple[np.ndarray, asyncio.Future[Any]]] = []
        total = 0
        while self._pending and (not batch or
                                 total + len(self._pending[0][0]) <= self.policy.max_rows):
            rows, future, queued = self._pending.popleft()
            self._rows -= len(rows)
            if not future.cancelled():  # its client went away
                batch.append((rows, future))
                total += len(rows)
                self.observer.waited(now - queued)
        return batch, total

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                if self.policy.max_delay_s > 0:
                    await self._wait_for_company(loop)
                batch, total = self._take(loop.time())
                if not batch:
                    continue
                self.observer.batch(total)
                try:
                    stacked = batch[0][0] if len(batch) == 1 else np.concatenate(
                        [rows for rows, _ in batch])
                    outputs = await loop.run_in_executor(self.executor, self._timed, stacked)
                except Exception as exc:  # every waiter gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for rows, future in batch:
                    stop = start + len(rows)
                    if not future.done():
                        future.set_result([out[start:stop] for out in outputs])
                    start = stop
        finally:
            self._draining = False


class Inference:
    """Sessions plus one batcher (one queue) per (model, role, sha256)."""

    def __init__(self, sessions: SessionCache, policy: BatchPolicy,
                 observer: Callable[[int, str], Any] | None = None,
                 workers: int = 2) -> None:
        self.sessions, self.policy = sessions, policy
        self.observer = observer or (lambda model_id, role: Observer())
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onnx")
        self.busy = Busy()  # every onnxruntime call of this process's models
        # each queue with its session's output names
        self._batchers: OrderedDict[tuple[int, str, str], tuple[Batcher, list[str]]] = (
            OrderedDict())

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def forget(self, model_id: int) -> None:
        """Drop a model's queues, sessions and downloaded files (the model was deleted)."""
        for key in [k for k in self._batchers if k[0] == model_id]:
            del self._batchers[key]
        self.sessions.forget(model_id)

    async def load(self, model_id: int, role: str, sha256: str | None, uri: str | None,
                   ) -> Loaded:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.sessions.get, model_id, role,
                                          sha256, uri)

    async def run(self, model_id: int, role: str, sha256: str, uri: str, rows: np.ndarray,
                  ) -> dict[str, np.ndarray]:
        key = (model_id, role, sha256)
        queue = self._batchers.get(key)
        if queue is None:
            loaded = self.sessions.cached(model_id, role, sha256)
            if loaded is None:  # opening a session reads the file: off the event loop
                loaded = await self.load(model_id, role, sha256, uri)
            queue = self._batchers.get(key)  # another request may have made it meanwhile
        if queue is None:
            names = served_outputs(loaded.output_names)

            def call(x: np.ndarray, loaded: Loaded = loaded) -> list[np.ndarray]:
                return loaded.session.run(names, {loaded.input_name: x})

            on_cpu = loaded.session.get_providers()[:1] == ["CPUExecutionProvider"]
            queue = (Batcher(call, self.executor, self.policy, self.observer(model_id, role),
                             self.busy, inline=on_cpu), names)
            self._batchers[key] = queue
            while len(self._batchers) > 4 * self.sessions.capacity:
                self._batchers.popitem(last=False)
        batcher, names = queue
        started = time.perf_counter()
        outputs = await batcher(np.ascontiguousarray(rows, dtype=np.float32))
        batcher.observer.served(time.perf_counter() - started)
        return dict(zip(names, outputs, strict=True))


def served_outputs(names: list[str]) -> list[str]:
    """The outputs serving asks a session for: all but a (continuous) Bernoulli decoder's
    `logits`, which only /score reads (through its own session call), so a decode
    returns no copy of the values it does not answer with."""
    return [n for n in names if n != "logits"] or names
