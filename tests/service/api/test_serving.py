"""Decoder serving: the fast path and the route answer alike, and both equal onnxruntime
run here on the model's own file; the batcher's answers equal unbatched calls."""

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.api import fastpath
from service.api.codecs import _fast_npy, load_npy, npy_bytes
from service.api.inference import Batcher, BatchPolicy
from tests.support import Served, store_untrained_model, whole_stack

MODEL = {"family": "mlp", "latent_dim": 6, "hidden": [32], "likelihood": "bernoulli",
         "input_shape": [1, 8, 8]}
NPY = "application/x-npy"


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# -- .npy codec: numpy's own reader and writer are the reference -------------------------

@pytest.mark.parametrize("array", [
    np.zeros((2, 3), np.float32), np.arange(5.0), np.float32(3).reshape(()),
    np.ones((1, 1, 8, 8), np.float32), np.arange(6, dtype=np.uint8),
    np.zeros((0, 4), np.float32), np.array([True, False]), np.arange(12, dtype=">f4"),
    np.arange(12, dtype="<f4"), np.zeros((1,) * 14, np.float32),
    np.zeros((10 ** 6, 0), np.float64)])
def test_npy_bytes_reads_back_with_numpy(array):
    got = np.load(io.BytesIO(npy_bytes(array)), allow_pickle=False)
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert (len(npy_bytes(array)) - array.nbytes) % 64 == 0  # numpy's header alignment
    # byte for byte what np.save writes, also when the header comes from the cache
    assert npy_bytes(array) == npy_bytes(array.copy()) == npy(np.require(array, None, "C"))


@pytest.mark.parametrize("array", [
    np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
    np.arange(7, dtype=np.int64), np.zeros((2, 0), np.float32), np.float64(2.5).reshape(())])
def test_numpys_own_files_are_read_without_a_copy(array):
    raw = npy(array)
    view = _fast_npy(raw)
    assert view is not None and view.base is not None  # a view of the body, no copy
    np.testing.assert_array_equal(view, array)
    assert view.shape == array.shape and view.dtype == array.dtype


def test_other_layouts_go_through_numpys_reader():
    for array in (np.asfortranarray(np.ones((3, 2))), np.arange(4, dtype=">f4")):
        raw = npy(array)
        assert _fast_npy(raw) is None
        np.testing.assert_array_equal(load_npy(raw, "z"), array)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ones((2, 2), np.float32), version=(2, 0))
    np.testing.assert_array_equal(load_npy(buffer.getvalue(), "z"), np.ones((2, 2)))
    assert _fast_npy(npy(np.ones((2, 2), np.float32))[:-4]) is None  # truncated: np.load's


# -- the batcher ------------------------------------------------------------------------

class Seen:
    def __init__(self):
        self.batches, self.waits = [], []

    def batch(self, rows):
        self.batches.append(rows)

    def waited(self, seconds):
        self.waits.append(seconds)

    def served(self, seconds):
        pass


def affine(x):
    """A row-wise function with two outputs, computed again independently below."""
    return [2 * x + 1, x.sum(axis=1, keepdims=True)]


async def gather_calls(batcher, sizes, seed=0):
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal((n, 3)).astype(np.float32) for n in sizes]
    outputs = await asyncio.wait_for(asyncio.gather(*(batcher(x) for x in inputs)), 30)
    return inputs, outputs


@pytest.mark.parametrize("policy", [BatchPolicy(), BatchPolicy(max_rows=8),
                                    BatchPolicy(max_rows=16, max_delay_s=0.02),
                                    BatchPolicy(enabled=False)])
def test_batched_answers_equal_unbatched_ones(policy):
    seen = Seen()
    with ThreadPoolExecutor(2) as pool:
        batcher = Batcher(affine, pool, policy, seen)
        sizes = [1, 3, 1, 7, 2, 20, 1, 1, 5]
        inputs, outputs = asyncio.run(gather_calls(batcher, sizes))
    for x, (doubled, total) in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(doubled, 2 * x + 1)
        np.testing.assert_allclose(total[:, 0], [sum(map(float, row)) for row in x],
                                   rtol=1e-5)
    assert sum(seen.batches) == sum(sizes) and len(seen.waits) == len(sizes)
    if policy.enabled:  # no call above the limit, unless one request alone is larger
        assert all(b <= policy.max_rows or b in sizes for b in seen.batches)
        assert len(seen.batches) < len(sizes)
    else:
        assert sorted(seen.batches) == sorted(sizes)


def test_a_delay_gathers_a_burst_into_one_call_and_a_full_batch_goes_at_once():
    async def burst(policy, n):
        seen = Seen()
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(affine, pool, policy, seen)
            await gather_calls(batcher, [1] * n)
        return seen.batches

    # 10 one-row calls made together wait for each other: one onnxruntime call
    assert asyncio.run(burst(BatchPolicy(max_delay_s=0.2), 10)) == [10]
    # a full batch does not wait out a long delay (the 30 s wait_for would fail first)
    assert asyncio.run(burst(BatchPolicy(max_rows=4, max_delay_s=60), 8)) == [4, 4]


def test_without_a_delay_a_lone_call_goes_at_once_and_later_ones_queue_behind_it():
    import threading

    release = threading.Event()
    seen = Seen()

    def held(x):
        release.wait(30)
        return [x]

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(held, pool, BatchPolicy(), seen)
            first = asyncio.ensure_future(batcher(np.zeros((1, 2), np.float32)))
            while not seen.batches:  # the first call is running, alone
                await asyncio.sleep(0.001)
            later = [asyncio.ensure_future(batcher(np.full((1, 2), i, np.float32)))
                     for i in range(9)]
            await asyncio.sleep(0.01)
            release.set()
            return await first, await asyncio.gather(*later)

    first, later = asyncio.run(main())
    np.testing.assert_array_equal(first[0], np.zeros((1, 2)))
    assert seen.batches == [1, 9]
    for i, answer in enumerate(later):
        np.testing.assert_array_equal(answer[0], np.full((1, 2), i))


def test_an_error_reaches_every_caller_of_its_batch_and_the_queue_goes_on():
    calls = []

    def flaky(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("onnxruntime failed")
        return [x]

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(flaky, pool, BatchPolicy(max_delay_s=0.1))
            first = await asyncio.gather(*(batcher(np.ones((1, 2), np.float32))
                                           for _ in range(3)), return_exceptions=True)
            second = await batcher(np.full((2, 2), 5, np.float32))
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) for e in first)
    np.testing.assert_array_equal(second[0], np.full((2, 2), 5))


def test_a_lone_short_call_runs_on_the_event_loop_and_a_crowd_is_still_batched():
    """With inline_max_s set, a lone call whose size's calls so far took under it runs on
    the loop's own thread; calls made together still make one batch in a worker thread;
    a call of a size never run, or estimated longer, goes to the thread."""
    import threading

    threads = []

    def where(x):
        threads.append(threading.current_thread().name)
        return [2 * x + 1]

    async def main():
        seen = Seen()
        with ThreadPoolExecutor(1, thread_name_prefix="onnx") as pool:
            batcher = Batcher(where, pool, BatchPolicy(inline_max_s=0.002), seen)
            first = await batcher(np.ones((40, 3), np.float32))  # no estimate: a thread
            batcher.learn(40, 0.0004)  # 40 rows in 0.4 ms: under the 2 ms
            batcher.learn(1, 0.00005)
            lone = await batcher(np.full((40, 3), 3, np.float32))
            crowd = await gather_calls(batcher, [1] * 6)
            unknown = await batcher(np.zeros((1000, 3), np.float32))  # a size never timed
            batcher.learn(1000, 0.01)  # 10 ms a call of this size
            long = await batcher(np.zeros((1000, 3), np.float32))
        return seen, first, lone, crowd, unknown, long

    seen, first, lone, (inputs, outputs), unknown, long = asyncio.run(main())
    assert threads[0].startswith("onnx") and threads[1] == "MainThread"
    np.testing.assert_array_equal(first[0], np.full((40, 3), 3))
    np.testing.assert_array_equal(lone[0], np.full((40, 3), 7))
    for x, (doubled,) in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(doubled, 2 * x + 1)
    # the six together: one call of six rows, in the thread (the first of them found
    # the others queued after its turn of the loop)
    assert seen.batches[2] == 6 and threads[2].startswith("onnx")
    assert seen.batches[3:] == [1000, 1000] and all(t.startswith("onnx") for t in threads[3:])
    np.testing.assert_array_equal(unknown[0], np.ones((1000, 3)))
    np.testing.assert_array_equal(long[0], np.ones((1000, 3)))
    assert len(threads) == 5


def test_no_call_runs_on_the_loop_while_another_runs_or_for_a_gpu_session():
    """Another onnxruntime call in flight in this process (any model, /score's) sends a
    lone call to the thread, and so does a session that is not on the CPU."""
    import threading

    threads = []

    def where(x):
        threads.append(threading.current_thread().name)
        return [x]

    async def main():
        with ThreadPoolExecutor(1, thread_name_prefix="onnx") as pool:
            on_cpu = Batcher(where, pool, BatchPolicy(inline_max_s=1.0))
            on_gpu = Batcher(where, pool, BatchPolicy(inline_max_s=1.0), inline=False)
            for batcher in (on_cpu, on_gpu):
                batcher.learn(2, 1e-6)
            await on_cpu(np.ones((2, 1), np.float32))  # idle: on the loop
            with on_cpu.busy:  # another call running
                await on_cpu(np.ones((2, 1), np.float32))
            await on_gpu(np.ones((2, 1), np.float32))

    asyncio.run(main())
    assert threads[0] == "MainThread"
    assert threads[1].startswith("onnx") and threads[2].startswith("onnx")


def test_a_lone_call_cancelled_in_its_turn_of_the_loop_leaves_the_queue_working():
    calls = []

    def counted(x):
        calls.append(len(x))
        return affine(x)

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(counted, pool, BatchPolicy(inline_max_s=1.0))
            batcher.learn(5, 1e-6)
            task = asyncio.ensure_future(batcher(np.ones((5, 3), np.float32)))
            await asyncio.sleep(0)  # the call is in its turn of the loop
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await asyncio.wait_for(batcher(np.full((2, 3), 2, np.float32)), 30)

    doubled, total = asyncio.run(main())
    np.testing.assert_array_equal(doubled, np.full((2, 3), 5))
    np.testing.assert_array_equal(total, np.full((2, 1), 6))
    assert calls == [2]  # the cancelled call's rows were never computed


def test_the_estimate_follows_the_calls_size_by_size():
    import time

    def slow(x):
        time.sleep(0.002 * len(x))  # 2 ms a row, measured by the batcher's own clock
        return [x]

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(slow, pool, BatchPolicy(inline_max_s=0.001))
            await batcher(np.ones((3, 1), np.float32))
            return batcher.per_row

    per_row = asyncio.run(main())
    assert list(per_row) == [2]  # 3 rows: the 2-3 size
    assert 0.002 <= per_row[2] < 0.02  # a sleep lasts at least what it was asked for


def test_a_session_of_a_deleted_models_file_is_not_found(tmp_path):
    """A model row read on a replica that has not yet replayed the model's deletion names
    files the primary's deletion removed: 404 (NotFound), not onnxruntime's error (500)."""
    from service.api.inference import SessionCache
    from store.artifacts import ArtifactStore
    from store.errors import NotFound

    store = ArtifactStore((tmp_path / "artifacts").as_uri())
    cache = SessionCache(store, str(tmp_path / "cache"), 2)
    uri = store.uri("models/7/attempt-1/encoder.onnx")
    with pytest.raises(NotFound, match="model 7 has no encoder file"):
        cache.get(7, "encoder", "ab" * 32, uri)
    (tmp_path / "artifacts/models/7/attempt-1").mkdir(parents=True)
    (tmp_path / "artifacts/models/7/attempt-1/encoder.onnx").write_bytes(b"x")
    assert cache.local_file(7, "encoder", "ab" * 32, uri) == store.local_path(
        "models/7/attempt-1/encoder.onnx")


# -- over HTTP --------------------------------------------------------------------------

@pytest.fixture(scope="module")
@whole_stack
def served_model(api_db, api_settings, tmp_path_factory):
    """A ready (untrained) model, and an API process of its own, so its caches start cold."""
    from service.api.app import create_app

    tmp = tmp_path_factory.mktemp("serving")
    model_id, decoder = store_untrained_model(api_db, api_settings, str(tmp), MODEL)
    served = Served(create_app(api_settings))
    session = ort.InferenceSession(decoder, providers=["CPUExecutionProvider"])
    yield served, model_id, session
    served.stop()


@pytest.fixture
def fast_calls(monkeypatch):
    """How many decodes the fast path answered (a counting wrapper around it)."""
    count = {"n": 0}
    real = fastpath.FastDecode._decode

    async def counted(self, *args, **kwargs):
        answer = await real(self, *args, **kwargs)
        count["n"] += 1
        return answer

    monkeypatch.setattr(fastpath.FastDecode, "_decode", counted)
    return count


def decode(c, model_id, z, body, answer):
    headers = {"Content-Type": NPY if body == "npy" else "application/json",
               "Accept": NPY if answer == "npy" else "application/json"}
    content = npy(z) if body == "npy" else None
    got = c.post(f"/v1/models/{model_id}/decode", content=content, headers=headers,
                 json=None if body == "npy" else {"z": z.tolist()})
    assert got.status_code == 200, got.text
    assert got.headers["content-type"] == headers["Accept"]
    if answer == "npy":
        return np.load(io.BytesIO(got.content), allow_pickle=False)
    return np.asarray(got.json()["x"], np.float32)


def test_every_decode_path_equals_onnxruntime(served_model, keys, fast_calls):
    served, model_id, session = served_model
    z = np.random.default_rng(3).standard_normal((300, 6)).astype(np.float32)
    with httpx.Client(base_url=served.url, timeout=60,
                      headers={"Authorization": f"Bearer {keys['read']}"}) as c:
        decode(c, model_id, z[:1], "json", "json")  # cold: the route loads key and model
        assert fast_calls["n"] == 0
        for rows in (1, 7, 300):  # 300 rows answer as header + the output's own buffer
            expected = session.run(["probs"], {"z": z[:rows]})[0]
            for body in ("json", "npy"):
                for answer in ("json", "npy"):
                    got = decode(c, model_id, z[:rows], body, answer)
                    assert got.shape == (rows, 1, 8, 8)
                    np.testing.assert_allclose(got, expected, atol=1e-6)
        assert fast_calls["n"] == 12


@pytest.mark.parametrize(("content", "kind", "words"), [
    (b'{"z": [[0, 0]]}', "application/json", ["6 values", "latent_dim"]),
    (b'{"z": [[0, 0, 0, 0, 0, 0]], "extra": 1}', "application/json", ["extra"]),
    (b'{"z": [[0, 0, 0, 0, 0, "a"]]}', "application/json", ["z"]),
    (b'{"z": [[0, 0, 0', "application/json", ["not valid JSON"]),
    (npy(np.full((1, 6), np.nan, np.float32)), NPY, ["non-finite"]),
    (npy(np.zeros((3, 5), np.float32)), NPY, ["6 values"]),
    (npy(np.array(["a"])), NPY, ["numeric"]),
])
def test_a_bad_body_gets_the_routes_error_on_a_warm_path(served_model, keys, content, kind,
                                                          words):
    served, model_id, _ = served_model
    with httpx.Client(base_url=served.url, timeout=60,
                      headers={"Authorization": f"Bearer {keys['read']}"}) as c:
        c.post(f"/v1/models/{model_id}/decode", json={"z": [[0] * 6]}).raise_for_status()
        got = c.post(f"/v1/models/{model_id}/decode", content=content,
                     headers={"Content-Type": kind})
    assert got.status_code == 422, got.text
    assert got.json()["error"]["code"] == "invalid_input"
    for word in words:
        assert word in got.json()["error"]["message"]


def test_the_fast_path_still_checks_the_key_and_the_limits(served_model, keys, api_settings):
    served, model_id, _ = served_model
    url = f"{served.url}/v1/models/{model_id}/decode"
    body = {"z": [[0.0] * 6]}
    httpx.post(url, json=body, headers={"Authorization": f"Bearer {keys['read']}"},
               timeout=60).raise_for_status()  # warm
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer lb_nope"},
                      timeout=60).status_code == 401
    big = npy(np.zeros((api_settings.decode_max_rows + 1, 6), np.float32))
    got = httpx.post(url, content=big, timeout=60, headers={
        "Authorization": f"Bearer {keys['read']}", "Content-Type": NPY})
    assert got.status_code == 422
    assert f"the limit is {api_settings.decode_max_rows}" in got.json()["error"]["message"]


def test_serving_metrics_are_per_model(served_model, keys):
    served, model_id, _ = served_model
    with httpx.Client(base_url=served.url, timeout=60,
                      headers={"Authorization": f"Bearer {keys['read']}"}) as c:
        for _ in range(3):
            c.post(f"/v1/models/{model_id}/decode", json={"z": [[0.0] * 6]}).raise_for_status()
        text = c.get("/metrics").text
    label = f'{{model="{model_id}",role="decoder"}}'
    for name in ("latentbank_decode_batch_rows_count", "latentbank_decode_queue_seconds_count",
                 "latentbank_inference_seconds_count"):
        line = next(x for x in text.splitlines() if x.startswith(name + label))
        assert float(line.split()[-1]) >= 3
    assert ('latentbank_http_request_duration_seconds_count{method="POST",'
            'route="/v1/models/{model_id}/decode",status="200"}') in text


def test_fastapis_own_telemetry_is_off_unless_the_setting_asks_for_it():
    """No OpenTelemetry provider is configured here, so FastAPI's check for one is all the
    hot path would pay; off, not even that. On, FastAPI's defaults stand."""
    import inspect

    from fastapi import FastAPI

    from service.api.app import _telemetry, create_app
    from store.settings import Settings

    assert Settings().opentelemetry is False and _telemetry(True) == {}
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        assert _telemetry(False) == {}  # a FastAPI without it: nothing to turn off
        return
    off = FastAPI(**_telemetry(False))._native_telemetry.config
    on = FastAPI(**_telemetry(True))._native_telemetry.config
    assert not any(off[k] for k in ("tracing", "metrics", "logs", "operation_spans"))
    assert all(on[k] for k in ("tracing", "metrics", "logs"))
    url = "postgresql+psycopg://nobody:none@127.0.0.1:9/none"  # create_app connects to none
    for asked in (False, True):
        app = create_app(Settings(database_url=url, opentelemetry=asked))
        assert app._native_telemetry.config["tracing"] is asked
