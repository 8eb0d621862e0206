"""`Client` (blocking) and `AsyncClient` (asyncio): the same resources and plans, run by
httpx.Client or httpx.AsyncClient."""
# size: the blocking and the asyncio runner side by side, so that they change together

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from latentbank_client import __version__
from latentbank_client._admin import Aliases, Keys
from latentbank_client._core import (
    RETRY_STATUSES,
    TERMINAL,
    Call,
    Deadline,
    Download,
    EventParser,
    Plan,
    Progress,
    RetryPolicy,
    Watch,
)
from latentbank_client._datasets import Datasets
from latentbank_client._embeddings import Embeddings
from latentbank_client._jobs import Jobs
from latentbank_client._models import Models
from latentbank_client.config import resolve
from latentbank_client.errors import (
    ConnectionFailed,
    LatentbankError,
    UnreadableAnswer,
    WaitTimeout,
    error_for,
    retry_after,
)
from latentbank_client.results import WhoAmI, build

# What the retry loops wait with; tests replace these.
sleep = time.sleep
async_sleep = asyncio.sleep


class _Base:
    """Configuration and resources shared by both clients."""

    def __init__(self, url: str | None = None, key: str | None = None, *,
                 timeout: float = 60.0, retry: RetryPolicy | None = None,
                 transport: Any = None) -> None:
        resolved = resolve(url, key)
        self.url, self.key = resolved.url, resolved.key
        self._withheld = resolved.withheld
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._headers = {"User-Agent": f"latentbank-client/{__version__}"}
        if self.key:
            self._headers["Authorization"] = f"Bearer {self.key}"
        self._transport = transport
        self.datasets = Datasets(self)
        self.models = Models(self)
        self.embeddings = Embeddings(self)
        self.jobs = Jobs(self)
        self.aliases = Aliases(self)
        self.keys = Keys(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, key={'set' if self.key else None})"

    def _error(self, response: httpx.Response) -> LatentbankError:
        hint = ""
        if response.status_code == 401 and self._withheld:
            hint = (f" (LATENTBANK_API_KEY is sent only to the URL given with it: set "
                    f"LATENTBANK_URL={self.url} to send it there)")
        return error_for(response, hint)

    def _unreachable(self, exc: Exception) -> ConnectionFailed:
        return ConnectionFailed(f"cannot reach the latentbank API at {self.url} "
                                f"({type(exc).__name__}: {exc}); start it with "
                                "`latentbank up` or set LATENTBANK_URL")

    def _unreadable(self, response: httpx.Response | None,
                    exc: ValueError) -> UnreadableAnswer:
        """A plan failed to read a success answer (JSON or .npy that is not): the API's
        side failed, not the caller's input."""
        if response is None:
            return UnreadableAnswer(f"the API at {self.url} sent an answer that is not its "
                                    f"JSON ({type(exc).__name__}: {exc})")
        ctype = response.headers.get("content-type") or "no content type"
        return UnreadableAnswer(
            f"the answer of {self.url} to {response.request.method} "
            f"{response.request.url.path} is not the latentbank API's ({ctype}; "
            f"{type(exc).__name__}: {exc}); is that URL the API, not a proxy's page?",
            status=response.status_code, response=response)

    def _advance(self, plan: Plan, value: Any, error: BaseException | None) -> Any:
        """The plan's next operation (StopIteration at its end). A ValueError that is not
        the client's own (a JSON or .npy answer that does not decode) raised while the
        plan reads an answer becomes UnreadableAnswer."""
        try:
            return plan.throw(error) if error is not None else plan.send(value)
        except ValueError as exc:
            if isinstance(exc, LatentbankError) or not (
                    isinstance(value, httpx.Response) or isinstance(exc, json.JSONDecodeError)):
                raise
            raise self._unreadable(value if isinstance(value, httpx.Response) else None,
                                   exc) from exc

    def _stream_timeout(self, deadline: Deadline) -> httpx.Timeout:
        left = deadline.left()
        read = 60.0 if left is None else max(0.1, min(60.0, left))
        return httpx.Timeout(self.timeout, read=read)

    def whoami(self) -> WhoAmI:
        """The calling key and its scopes."""
        def plan() -> Plan:
            response = yield Call("GET", "/v1/whoami")
            return build(WhoAmI, response.json())
        return self._run(plan())

    def health(self) -> dict[str, Any]:
        """The API's readiness: {"status", "checks": {"database", "broker"}}."""
        def plan() -> Plan:
            response = yield Call("GET", "/readyz")
            return response.json()
        return self._run(plan())

    def _run(self, plan: Plan) -> Any:  # pragma: no cover - defined by each client
        raise NotImplementedError


class _Watch:
    """The state of one `Watch`: the event stream first, polling once it keeps failing."""

    def __init__(self, op: Watch) -> None:
        self.job = op.job
        self.path = f"/v1/jobs/{op.job['id']}"
        self.progress = Progress(op.progress)
        self.deadline = Deadline(op.timeout)
        self.poll = op.poll
        self.streaming = True
        self.failures = 0
        self.events_seen = False

    def update(self, job: dict[str, Any]) -> bool:
        """Record a state; True once the job has ended."""
        self.job = job
        self.progress.update(job)
        return job.get("status") in TERMINAL

    def check(self) -> None:
        if self.deadline.passed():
            raise WaitTimeout(f"job {self.job['id']} is still {self.job.get('status')} "
                              "after the wait's timeout")

    def broke(self) -> float:
        """The stream failed (a broken connection, or 429/5xx): the wait before the next
        try; after three failures in a row, fall back to polling."""
        self.failures += 1
        if self.failures >= 3:
            self.streaming = False
        return min(8.0, 0.5 * 2 ** self.failures)

    def started(self) -> None:
        """A stream opened: `ended_empty` tells whether it brought any event."""
        self.events_seen = False

    def ended_empty(self) -> bool:
        return not self.events_seen

    def wait_time(self, seconds: float) -> float:
        left = self.deadline.left()
        return seconds if left is None else max(0.0, min(seconds, left))


class Client(_Base):
    """A blocking client of the latentbank API.

        client = Client()                      # or Client(url=..., key=...)
        ds = client.datasets.add(array, name="demo")
        model = client.models.train(ds.id, model={...}).wait(progress=True).model()

    `url`/`key` default as the CLI's (LATENTBANK_URL, LATENTBANK_API_KEY, the local
    stack: see latentbank_client.config). Requests are retried by `retry` (a
    RetryPolicy); `transport` is an httpx transport (e.g. httpx.MockTransport in tests).
    Use as a context manager, or call `close()`."""

    def __init__(self, url: str | None = None, key: str | None = None, *,
                 timeout: float = 60.0, retry: RetryPolicy | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, key, timeout=timeout, retry=retry, transport=transport)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _run(self, plan: Plan) -> Any:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = self._advance(plan, value, error)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                if isinstance(op, Call):
                    value = self._send(op)
                elif isinstance(op, Download):
                    value = self._download(op)
                elif isinstance(op, Watch):
                    value = self._watch(op)
                else:
                    raise TypeError(f"unknown operation {op!r}")
            except Exception as exc:
                error = exc

    def _send(self, call: Call, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            kwargs, opened = call.request_kwargs()
            try:
                request = self._http.build_request(call.method, call.path, **kwargs)
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry.delay(attempt) if self.retry.retries_transport(
                    call, exc) else None
                if delay is None:
                    raise self._unreachable(exc) from exc
                sleep(delay)
                attempt += 1
                continue
            finally:
                for f in opened:
                    f.close()
            if response.status_code >= 400:
                response.read()
                if response.status_code in RETRY_STATUSES:
                    delay = self.retry.delay(attempt, retry_after(response))
                    if delay is not None:
                        response.close()
                        sleep(delay)
                        attempt += 1
                        continue
                raise self._error(response)
            return response

    def _download(self, op: Download) -> httpx.Response:
        attempt = 0
        while True:
            response = self._send(op.call, stream=True)
            op.sink.seek(0)
            op.sink.truncate()
            try:
                for chunk in response.iter_bytes():
                    op.sink.write(chunk)
                return response
            except httpx.TransportError as exc:
                delay = self.retry.delay(attempt)
                if delay is None:
                    raise self._unreachable(exc) from exc
                sleep(delay)
                attempt += 1
            finally:
                response.close()

    def _watch(self, op: Watch) -> dict[str, Any]:
        w = _Watch(op)
        try:
            if w.update(op.job):
                return w.job
            while True:
                w.check()
                if not w.streaming:
                    if w.update(self._send(Call("GET", w.path)).json()):
                        return w.job
                    sleep(w.wait_time(w.poll))
                    continue
                try:
                    with self._http.stream("GET", w.path + "/events",
                                           timeout=self._stream_timeout(w.deadline)) as r:
                        if r.status_code >= 400:
                            r.read()
                            if r.status_code not in RETRY_STATUSES and r.status_code < 500:
                                raise self._error(r)
                            sleep(w.wait_time(w.broke()))
                            continue
                        parser = EventParser()
                        w.started()
                        for line in r.iter_lines():
                            got = parser.feed(line)
                            if got is not None:
                                w.failures, w.events_seen = 0, True
                                if w.update(got[1]):
                                    return w.job
                            w.check()
                    if w.ended_empty():  # closed with nothing said: not at once again
                        sleep(w.wait_time(w.broke()))
                except httpx.TransportError:
                    w.check()
                    sleep(w.wait_time(w.broke()))
        finally:
            w.progress.close()


class AsyncClient(_Base):
    """The asyncio client: the same resources and results as `Client`, whose methods
    (and those of the results it returns) are awaited.

        async with AsyncClient() as client:
            job = await client.models.train(ds.id, model={...})
            model = await (await job.wait()).model()

    Works inside a running event loop (Jupyter)."""

    def __init__(self, url: str | None = None, key: str | None = None, *,
                 timeout: float = 60.0, retry: RetryPolicy | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, key, timeout=timeout, retry=retry, transport=transport)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers,
                                       timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.aclose()

    async def _run(self, plan: Plan) -> Any:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = self._advance(plan, value, error)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                if isinstance(op, Call):
                    value = await self._send(op)
                elif isinstance(op, Download):
                    value = await self._download(op)
                elif isinstance(op, Watch):
                    value = await self._watch(op)
                else:
                    raise TypeError(f"unknown operation {op!r}")
            except Exception as exc:
                error = exc

    async def _send(self, call: Call, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            kwargs, opened = call.request_kwargs()
            try:
                request = self._http.build_request(call.method, call.path, **kwargs)
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry.delay(attempt) if self.retry.retries_transport(
                    call, exc) else None
                if delay is None:
                    raise self._unreachable(exc) from exc
                await async_sleep(delay)
                attempt += 1
                continue
            finally:
                for f in opened:
                    f.close()
            if response.status_code >= 400:
                await response.aread()
                if response.status_code in RETRY_STATUSES:
                    delay = self.retry.delay(attempt, retry_after(response))
                    if delay is not None:
                        await response.aclose()
                        await async_sleep(delay)
                        attempt += 1
                        continue
                raise self._error(response)
            return response

    async def _download(self, op: Download) -> httpx.Response:
        attempt = 0
        while True:
            response = await self._send(op.call, stream=True)
            op.sink.seek(0)
            op.sink.truncate()
            try:
                async for chunk in response.aiter_bytes():
                    op.sink.write(chunk)
                return response
            except httpx.TransportError as exc:
                delay = self.retry.delay(attempt)
                if delay is None:
                    raise self._unreachable(exc) from exc
                await async_sleep(delay)
                attempt += 1
            finally:
                await response.aclose()

    async def _watch(self, op: Watch) -> dict[str, Any]:
        w = _Watch(op)
        try:
            if w.update(op.job):
                return w.job
            while True:
                w.check()
                if not w.streaming:
                    if w.update((await self._send(Call("GET", w.path))).json()):
                        return w.job
                    await async_sleep(w.wait_time(w.poll))
                    continue
                try:
                    async with self._http.stream(
                            "GET", w.path + "/events",
                            timeout=self._stream_timeout(w.deadline)) as r:
                        if r.status_code >= 400:
                            await r.aread()
                            if r.status_code not in RETRY_STATUSES and r.status_code < 500:
                                raise self._error(r)
                            await async_sleep(w.wait_time(w.broke()))
                            continue
                        parser = EventParser()
                        w.started()
                        async for line in r.aiter_lines():
                            got = parser.feed(line)
                            if got is not None:
                                w.failures, w.events_seen = 0, True
                                if w.update(got[1]):
                                    return w.job
                            w.check()
                    if w.ended_empty():  # closed with nothing said: not at once again
                        await async_sleep(w.wait_time(w.broke()))
                except httpx.TransportError:
                    w.check()
                    await async_sleep(w.wait_time(w.broke()))
        finally:
            w.progress.close()
