"""Units over httpx.MockTransport: error mapping, retries, back-off, Retry-After,
Idempotency-Key reuse, the event stream and its polling fallback, argument checks."""

import asyncio
import email.utils
import io
import json
import time

import httpx
import latentbank_client.client as client_module
import numpy as np
import pytest
from latentbank_client import (
    AsyncClient,
    Client,
    Conflict,
    ConnectionFailed,
    Forbidden,
    InvalidInput,
    JobFailed,
    LatentbankError,
    NotFound,
    RateLimited,
    RetryPolicy,
    ServerError,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from latentbank_client._core import ref

URL = "http://api.test"
JOB = {"id": 5, "kind": "train", "status": "queued", "progress": 0.0, "attempts": 0,
       "max_attempts": 3, "cancel_requested": False, "params": {},
       "created_at": "2026-01-01T00:00:00Z", "published": True}


@pytest.fixture
def slept(monkeypatch):
    """The waits the retry loops asked for (none is really waited)."""
    waits = []
    monkeypatch.setattr(client_module, "sleep", waits.append)

    async def fake(seconds):
        waits.append(seconds)

    monkeypatch.setattr(client_module, "async_sleep", fake)
    return waits


def make(handler, **kwargs):
    return Client(url=URL, key="k", transport=httpx.MockTransport(handler), **kwargs)


def error(status, code="some_code", message="what went wrong", headers=None):
    return httpx.Response(status, json={"error": {"code": code, "message": message}},
                          headers=headers)


@pytest.mark.parametrize(("status", "cls"), [
    (400, InvalidInput), (401, Unauthorized), (403, Forbidden), (404, NotFound),
    (406, InvalidInput), (409, Conflict), (413, TooLarge), (415, InvalidInput),
    (422, InvalidInput), (429, RateLimited), (500, ServerError), (503, Unavailable)])
def test_each_status_maps_to_its_error(status, cls, slept):
    calls = []

    def handler(request):
        calls.append(request)
        return error(status, "the_code", f"refused with {status}")

    with make(handler, retry=RetryPolicy(attempts=1)) as c, pytest.raises(cls) as caught:
        c.models.get(3)
    e = caught.value
    assert isinstance(e, LatentbankError)
    assert (e.status, e.code, e.message) == (status, "the_code", f"refused with {status}")
    assert str(e) == f"refused with {status} ({status} the_code)"
    assert len(calls) == 1 and slept == []
    assert calls[0].headers["authorization"] == "Bearer k"


def test_an_error_without_the_json_shape_keeps_its_text(slept):
    def handler(request):
        return httpx.Response(502, text="bad gateway from the proxy\nmore")

    with make(handler) as c, pytest.raises(ServerError, match="bad gateway from the proxy"):
        c.datasets.get(1)


def test_retry_after_is_honoured(slept):
    answers = [error(429, headers={"Retry-After": "7"}), error(503, headers={"Retry-After": "2"}),
               httpx.Response(200, json={"id": 3, "status": "ready"})]

    def handler(request):
        return answers.pop(0)

    with make(handler) as c:
        model = c.models.get(3)
    assert model.id == 3 and model.status == "ready"
    assert slept == [7.0, 2.0]


def test_retry_after_as_an_http_date(slept):
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    answers = [error(429, headers={"Retry-After": when}), httpx.Response(200, json={"id": 1})]

    with make(lambda request: answers.pop(0)) as c:
        c.datasets.get(1)
    assert len(slept) == 1 and 25 <= slept[0] <= 31


def test_a_retry_after_too_long_is_raised_at_once(slept):
    calls = []

    def handler(request):
        calls.append(1)
        return error(429, headers={"Retry-After": "120"})

    with make(handler) as c, pytest.raises(RateLimited) as caught:
        c.models.get(3)
    assert caught.value.retry_after == 120.0 and len(calls) == 1 and slept == []


def test_back_off_is_exponential_and_bounded(slept):
    calls = []

    def handler(request):
        calls.append(1)
        return error(503, "database_unavailable")

    policy = RetryPolicy(attempts=6, backoff=1.0, max_backoff=3.0)
    with make(handler, retry=policy) as c, pytest.raises(Unavailable) as caught:
        c.models.get(3)
    assert len(calls) == 6 and slept == [1.0, 2.0, 3.0, 3.0, 3.0]
    assert caught.value.retry_after is None

    calls.clear()
    slept.clear()
    with make(handler) as c, pytest.raises(Unavailable):  # the default policy
        c.models.get(3)
    assert len(calls) == 4 and slept == [0.5, 1.0, 2.0]


def test_connection_errors_are_retried_then_raised(slept):
    calls = []

    def handler(request):
        calls.append(1)
        raise httpx.ConnectError("connection refused", request=request)

    with make(handler) as c, pytest.raises(ConnectionFailed, match="cannot reach"):
        c.datasets.list()
    assert len(calls) == 4 and slept == [0.5, 1.0, 2.0]


def test_submissions_reuse_their_idempotency_key_across_retries(slept):
    seen = []

    def handler(request):
        seen.append(request.headers.get("idempotency-key"))
        if len(seen) in (1, 3):  # each submission's first answer is lost
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(202, json={**JOB, "id": len(seen)})

    with make(handler) as c:
        first = c.models.train(1, model={"family": "mlp", "latent_dim": 2})
        second = c.embeddings.create(2, 1, importance_samples=3)
    assert (first.id, second.id) == (2, 4)
    assert seen[0] == seen[1] and seen[2] == seen[3] and seen[0] != seen[2]
    assert all(len(k) == 36 for k in seen)  # uuid4
    assert slept == [0.5, 0.5]


def test_a_given_idempotency_key_is_sent(slept):
    seen = []

    def handler(request):
        seen.append(request.headers.get("idempotency-key"))
        return httpx.Response(202, json=JOB)

    with make(handler) as c:
        c.models.train(1, model={"family": "mlp", "latent_dim": 2}, idempotency_key="mine-1")
    assert seen == ["mine-1"]


def test_a_call_unsafe_to_repeat_is_not_retried_after_a_broken_connection(slept):
    calls = []

    def handler(request):
        calls.append(1)
        raise httpx.ReadError("connection reset", request=request)

    with make(handler) as c, pytest.raises(ConnectionFailed):
        c.keys.create("ci", ["read"])
    assert len(calls) == 1 and slept == []


class ActsThenBreaks:
    """A server that does what each request asks, but whose first answer to it is lost
    (the connection breaks after it acted): a repeat would meet the changed state (404
    for a second DELETE, 409 for a second cancel, 200 rather than 201 for a second
    PUT)."""

    def __init__(self):
        self.done = set()
        self.requests = []

    def __call__(self, request):
        self.requests.append((request.method, request.url.path))
        what = (request.method, request.url.path)
        if what in self.done:
            if request.method == "GET":
                return httpx.Response(200, json=JOB)
            if request.url.path.endswith("/decode"):
                return httpx.Response(200, content=request.content,
                                      headers={"content-type": "application/x-npy"})
            return error(404 if request.method == "DELETE" else 409)
        self.done.add(what)
        raise httpx.ReadError("connection reset", request=request)


@pytest.mark.parametrize("call", [
    lambda c: c.models.delete(3), lambda c: c.embeddings.delete(4),
    lambda c: c.datasets.delete(2), lambda c: c.aliases.delete("prod"),
    lambda c: c.aliases.set("prod", model=3), lambda c: c.jobs.cancel(5),
    lambda c: c.keys.revoke(6)],
    ids=["models.delete", "embeddings.delete", "datasets.delete", "aliases.delete",
         "aliases.set", "jobs.cancel", "keys.revoke"])
def test_a_change_is_not_repeated_after_the_server_acted_and_the_connection_broke(
        slept, call):
    """Not a false 404/409 (the change happened), but the broken connection: the outcome
    is unknown, ConnectionFailed (the CLI's exit 3), after one request."""
    server = ActsThenBreaks()
    with make(server) as c, pytest.raises(ConnectionFailed, match="cannot reach"):
        call(c)
    assert len(server.requests) == 1 and slept == []


def test_reads_and_computations_are_still_retried_after_a_broken_connection(slept):
    from latentbank_client import Model
    from latentbank_client.results import build

    server = ActsThenBreaks()
    with make(server) as c:
        assert c.jobs.get(5).id == 5
        model = build(Model, {"id": 1, "config": {"model": {"latent_dim": 2}}}, c)
        assert model.decode([1.0, 2.0]).shape == (1, 2)
    assert server.requests == [("GET", "/v1/jobs/5")] * 2 + [("POST",
                                                              "/v1/models/1/decode")] * 2


def test_async_client_retries_with_the_same_key(slept):
    seen = []

    def handler(request):
        seen.append(request.headers.get("idempotency-key"))
        if len(seen) == 1:
            return error(429, headers={"Retry-After": "3"})
        return httpx.Response(202, json=JOB)

    async def run():
        async with AsyncClient(url=URL, key="k", transport=httpx.MockTransport(handler)) as c:
            return await c.models.train(1, model={"family": "mlp", "latent_dim": 2})

    job = asyncio.run(run())
    assert job.id == 5 and seen[0] == seen[1] and slept == [3.0]


def events(*states):
    text = "".join(f"id: {i}\nevent: progress\ndata: {json.dumps(s)}\n\n"
                   for i, s in enumerate(states))
    text += f"event: end\ndata: {json.dumps(states[-1])}\n\n"
    return httpx.Response(200, text=": keep-alive\n\n" + text,
                          headers={"content-type": "text/event-stream"})


def test_wait_follows_the_event_stream(slept):
    states = [{**JOB, "status": "running", "progress": 0.5, "progress_message": "epoch 1/2"},
              {**JOB, "status": "succeeded", "progress": 1.0, "model_id": 9}]

    def handler(request):
        if request.url.path == "/v1/jobs/5/events":
            return events(*states)
        if request.url.path == "/v1/training-jobs":
            return httpx.Response(202, json=JOB)
        if request.url.path == "/v1/models/9":
            return httpx.Response(200, json={"id": 9, "status": "ready"})
        return error(404)

    seen = []
    with make(handler) as c:
        job = c.models.train(1, model={"family": "mlp", "latent_dim": 2})
        done = job.wait(progress=seen.append)
        assert done.status == "succeeded" and done.model_id == 9
        assert done.model().id == 9
    assert [s["status"] for s in seen] == ["queued", "running", "succeeded"]


def test_wait_shows_plain_lines_without_tqdm(slept, capsys, monkeypatch):
    monkeypatch.setenv("LATENTBANK_NO_TQDM", "1")
    states = [{**JOB, "status": "running", "progress": 0.5}, {**JOB, "status": "succeeded",
                                                             "progress": 1.0}]
    with make(lambda request: events(*states)) as c:
        from latentbank_client import Job
        from latentbank_client.results import build

        build(Job, JOB, c).wait(progress=True)
    err = capsys.readouterr().err
    assert "job 5 (train): running 50%" in err and "job 5 (train): succeeded 100%" in err


def test_wait_raises_job_failed(slept):
    failed = {**JOB, "status": "failed", "error": "the data has NaN"}

    with make(lambda request: events(failed)) as c:
        from latentbank_client import Job
        from latentbank_client.results import build

        with pytest.raises(JobFailed, match="the data has NaN") as caught:
            build(Job, JOB, c).wait()
    assert caught.value.job.status == "failed"


def test_wait_falls_back_to_polling(slept):
    polled = []

    def handler(request):
        if request.url.path.endswith("/events"):
            return error(500, "internal")
        polled.append(1)
        return httpx.Response(200, json={**JOB, "status": "running" if len(polled) < 3
                                         else "succeeded"})

    with make(handler) as c:
        from latentbank_client import Job
        from latentbank_client.results import build

        done = build(Job, JOB, c).wait(poll=0.25)
    assert done.status == "succeeded" and len(polled) == 3
    assert slept == [1.0, 2.0, 4.0, 0.25, 0.25]  # three stream failures, then two polls


def test_arguments_are_checked_before_any_request(slept):
    def handler(request):
        raise AssertionError("no request expected")

    with make(handler) as c:
        with pytest.raises(InvalidInput, match=r"shape \(n, \.\.\.\)"):
            c.datasets.add(np.zeros(5))
        with pytest.raises(InvalidInput, match="labels has 3 entries for 4 items"):
            c.datasets.add(np.zeros((4, 2)), labels=[1, 2, 3])
        with pytest.raises(InvalidInput, match="numeric"):
            c.datasets.add(np.array([["a"], ["b"]], dtype=object))
        with pytest.raises(InvalidInput, match="does not exist"):
            c.datasets.add("/no/such/file.npy")
        with pytest.raises(InvalidInput, match="exactly one"):
            c.datasets.add(np.zeros((4, 2)), builtin="digits")
        with pytest.raises(InvalidInput, match="@alias"):
            c.models.get("prod")
        # an alias is one path segment whatever it holds: '/', '?' and '..' are escaped
        assert ref("@prod", "model") == "@prod"
        assert ref("@a/../b?x=1", "model") == "@a%2F..%2Fb%3Fx%3D1"
        with pytest.raises(InvalidInput, match="model= must be a dict"):
            c.models.train(1, model="mlp")
        with pytest.raises(InvalidInput, match="scopes"):
            c.keys.create("x", ["root"])
        from latentbank_client import EmbeddingSet, Model
        from latentbank_client.results import build

        es = build(EmbeddingSet, {"id": 1, "dim": 4}, c)
        with pytest.raises(InvalidInput, match="exactly one of vector, key= and image="):
            es.search(np.zeros(4), key="3")
        with pytest.raises(InvalidInput, match=r"shape \(n, 4\)"):
            es.search(np.zeros(3))
        with pytest.raises(InvalidInput, match="metric"):
            es.search(key="3", metric="manhattan")
        model = build(Model, {"id": 1, "config": {"model": {"latent_dim": 2}}}, c)
        with pytest.raises(InvalidInput, match="NaN"):
            model.decode([[0.0, float("nan")]])
        with pytest.raises(InvalidInput, match="fpr"):
            model.score(np.zeros((1, 2)), fpr=0.9)


def test_arrays_travel_as_npy(slept):
    bodies = []

    def handler(request):
        bodies.append((request.headers["content-type"], request.headers.get("accept"),
                       request.content))
        x = np.load(io.BytesIO(request.content))
        out = io.BytesIO()
        np.save(out, (x * 2).astype(np.float32))
        return httpx.Response(200, content=out.getvalue(),
                              headers={"content-type": "application/x-npy"})

    with make(handler) as c:
        from latentbank_client import Model
        from latentbank_client.results import build

        model = build(Model, {"id": 1, "config": {"model": {"latent_dim": 2}}}, c)
        out = model.decode([1.0, 2.0])  # one point becomes one row
    np.testing.assert_array_equal(out, [[2.0, 4.0]])
    assert bodies[0][:2] == ("application/x-npy", "application/x-npy")


def test_results_tolerate_unknown_fields_and_parse_times(slept):
    answer = {**JOB, "a_field_from_the_future": {"x": 1}, "finished_at": None}
    with make(lambda request: httpx.Response(200, json=answer)) as c:
        job = c.jobs.get(5)
    assert job.id == 5 and job.created_at.year == 2026 and job.created_at.tzinfo is not None
    assert job.finished_at is None and not hasattr(job, "a_field_from_the_future")


def test_wait_drives_a_tqdm_bar_when_tqdm_is_installed(slept, monkeypatch):
    import sys
    import types

    bars = []

    class FakeBar:
        def __init__(self, total, desc, bar_format):
            self.total, self.desc, self.n, self.postfix, self.closed = total, desc, 0, "", False
            bars.append(self)

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text

        def refresh(self):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", types.SimpleNamespace(tqdm=FakeBar))
    monkeypatch.delenv("LATENTBANK_NO_TQDM", raising=False)
    long = "epoch 2/2 " + "x" * 100
    states = [{**JOB, "status": "running", "progress": 0.25},
              {**JOB, "status": "succeeded", "progress": 1.0, "progress_message": long}]
    with make(lambda request: events(*states)) as c:
        from latentbank_client import Job
        from latentbank_client.results import build

        build(Job, JOB, c).wait(progress=True)
    (bar,) = bars
    assert (bar.desc, bar.total, bar.n, bar.closed) == ("job 5 (train)", 100.0, 100.0, True)
    assert bar.postfix.startswith("succeeded epoch 2/2") and len(bar.postfix) <= 70


def test_a_stream_that_closes_at_once_is_not_reopened_in_a_tight_loop(slept):
    opened, polled = [], []

    def handler(request):
        if request.url.path.endswith("/events"):
            opened.append(1)
            return httpx.Response(200, text=": nothing\n\n",
                                  headers={"content-type": "text/event-stream"})
        polled.append(1)
        return httpx.Response(200, json={**JOB, "status": "succeeded"})

    with make(handler) as c:
        from latentbank_client import Job
        from latentbank_client.results import build

        assert build(Job, JOB, c).wait().status == "succeeded"
    assert len(opened) == 3 and len(polled) == 1 and slept == [1.0, 2.0, 4.0]


def test_async_wait_follows_the_event_stream(slept):
    states = [{**JOB, "status": "running", "progress": 0.5},
              {**JOB, "status": "succeeded", "progress": 1.0, "embedding_set_id": 4}]

    def handler(request):
        if request.url.path == "/v1/jobs/5/events":
            return events(*states)
        if request.url.path == "/v1/jobs/5":
            return httpx.Response(200, json=JOB)
        if request.url.path == "/v1/embeddings/4":
            return httpx.Response(200, json={"id": 4, "status": "ready", "n_items": 3})
        return error(404)

    async def run():
        async with AsyncClient(url=URL, key="k", transport=httpx.MockTransport(handler)) as c:
            job = await c.jobs.get(5)
            seen = []
            done = await job.wait(progress=seen.append)
            return seen, await done.embedding_set()

    seen, es = asyncio.run(run())
    assert [s["status"] for s in seen][-1] == "succeeded" and (es.id, es.n_items) == (4, 3)


def test_wait_gives_up_after_its_timeout(slept):
    from latentbank_client import Job, WaitTimeout
    from latentbank_client.results import build

    with make(lambda request: events({**JOB, "status": "running"})) as c, \
            pytest.raises(WaitTimeout, match="still queued"):
        build(Job, JOB, c).wait(timeout=0)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_an_export_is_made_as_open_would_make_it_and_whole_or_not_at_all(slept, tmp_path,
                                                                         umask):
    """Mode 0666 less the umask (a temporary file's 0600 was not what the user's umask
    asks for), renamed into place once whole; a failed export leaves nothing."""
    import os

    def handler(request):
        if request.url.path == "/v1/embeddings/4":
            return httpx.Response(200, json={"id": 4, "dim": 2, "status": "ready"})
        if request.url.path == "/v1/embeddings/5":
            return httpx.Response(200, json={"id": 5, "dim": 2, "status": "ready"})
        if request.url.path == "/v1/embeddings/4/export":
            return httpx.Response(200, content=b"PAR1 rows PAR1")
        return error(500)

    before = os.umask(umask)
    try:
        with make(handler) as c:
            target = c.embeddings.get(4).export(tmp_path / "set.parquet")
            with pytest.raises(ServerError):
                c.embeddings.get(5).export(tmp_path / "other.parquet")
    finally:
        os.umask(before)
    assert target.read_bytes() == b"PAR1 rows PAR1"
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.parquet"]


def test_a_success_answer_that_is_not_the_apis_is_unreadable_answer(slept):
    """A proxy's HTML page with 200 where JSON or .npy was due: UnreadableAnswer, an
    API-side failure naming the URL and what came, not a bare JSONDecodeError (a
    ValueError, taken for bad input)."""
    from latentbank_client import Model, UnreadableAnswer
    from latentbank_client.results import build

    page = httpx.Response(200, text="<html>Sign in to the proxy</html>",
                          headers={"content-type": "text/html"})
    with make(lambda request: page) as c:
        with pytest.raises(UnreadableAnswer) as got:
            c.models.list()
        assert got.value.status == 200 and not isinstance(got.value, InvalidInput)
        assert str(got.value.message).startswith(
            f"the answer of {URL} to GET /v1/models is not the latentbank API's (text/html; "
            "JSONDecodeError: ")
        model = build(Model, {"id": 1, "config": {"model": {"latent_dim": 2}}}, c)
        with pytest.raises(UnreadableAnswer, match="POST /v1/models/1/decode"):
            model.decode([1.0, 2.0])  # not an .npy
        with pytest.raises(InvalidInput):  # the caller's own mistakes stay InvalidInput
            model.decode([[float("nan"), 1.0]])


def test_async_client_reports_an_unreadable_answer_too(slept):
    from latentbank_client import UnreadableAnswer

    async def go():
        async with AsyncClient(url=URL, key="k", transport=httpx.MockTransport(
                lambda request: httpx.Response(200, text="<html/>"))) as c:
            await c.models.list()

    with pytest.raises(UnreadableAnswer):
        asyncio.run(go())
