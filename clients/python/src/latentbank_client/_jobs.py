"""Jobs: training, embedding and ingest work queued on the workers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from latentbank_client._core import TERMINAL, Call, Plan, Watch, ident
from latentbank_client.display import bar, html_table
from latentbank_client.errors import JobFailed, LatentbankError
from latentbank_client.results import FromApi, build


class Resource:
    """A collection of the API (client.datasets, client.models, ...)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def _run(self, plan: Plan) -> Any:
        return self._client._run(plan)


@dataclass(kw_only=True)
class Bound(FromApi):
    """A result that can make further calls through the client it came from. With an
    `AsyncClient`, its methods return awaitables."""

    _client: Any = field(default=None, repr=False, compare=False)
    _raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def _run(self, plan: Plan) -> Any:
        if self._client is None:
            raise LatentbankError(f"this {type(self).__name__} is not bound to a client")
        return self._client._run(plan)


@dataclass(kw_only=True)
class Job(Bound):
    """A job (server schema JobOut): `kind` train, embed or ingest; `status` queued,
    running, succeeded, failed or cancelled; `progress` 0..1."""

    id: int
    kind: str = ""
    status: str = ""
    progress: float = 0.0
    progress_message: str | None = None
    eta_seconds: float | None = None
    items_done: int = 0
    items_total: int | None = None
    attempts: int = 0
    max_attempts: int | None = None
    error: str | None = None
    cancel_requested: bool = False
    model_id: int | None = None
    embedding_set_id: int | None = None
    dataset_id: int | None = None
    sweep_id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    published: bool | None = None
    mlflow: dict[str, Any] | None = None  # the MLflow run's sync state (jobs.get only)

    @property
    def done(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.status in TERMINAL

    def refresh(self) -> Job:
        """The job's state now (a new Job)."""
        return self._run(_get_job(self._client, self.id))

    def wait(self, progress: Any = False, timeout: float | None = None,
             poll: float = 1.0) -> Job:
        """Follow the job to its end and return it, finished. `progress=True` shows a bar
        (tqdm when installed, else plain lines on stderr) from the server's event stream
        (`/v1/jobs/{id}/events`; polled every `poll` s if the stream is unavailable); a
        callable gets each state (a dict) instead. Raises `JobFailed` when the job failed
        or was cancelled, `WaitTimeout` after `timeout` seconds."""
        return self._run(_wait(self._client, self, progress, timeout, poll))

    def result(self, progress: Any = False, timeout: float | None = None) -> Any:
        """What the job made, once it has succeeded (waiting for it): a training job's
        `Model`, an embedding job's `EmbeddingSet`, an ingest job's `Dataset`."""
        return self._run(_result(self._client, self, progress, timeout))

    def model(self) -> Any:
        """The job's model (a training or embedding job)."""
        return self._run(_linked(self._client, self, "model_id"))

    def embedding_set(self) -> Any:
        """The embedding set an embedding job wrote."""
        return self._run(_linked(self._client, self, "embedding_set_id"))

    def dataset(self) -> Any:
        """The dataset an ingest job registered (or a job's input dataset)."""
        return self._run(_linked(self._client, self, "dataset_id"))

    def cancel(self) -> Job:
        """Ask the job to stop (a queued one never starts); Conflict once it has ended."""
        return self._run(_cancel(self._client, self.id))

    def _repr_html_(self) -> str:
        return html_table(f"latentbank job {self.id} ({self.kind})", [
            ("status", self.status), ("progress", bar(self.progress)),
            ("message", self.progress_message), ("attempts", self.attempts),
            ("error", self.error), ("model", self.model_id),
            ("embedding set", self.embedding_set_id), ("dataset", self.dataset_id),
            ("created", self.created_at), ("finished", self.finished_at)])


def _get_job(client: Any, job_id: int) -> Plan:
    response = yield Call("GET", f"/v1/jobs/{job_id}")
    return build(Job, response.json(), client)


def _wait(client: Any, job: Job, progress: Any, timeout: float | None, poll: float) -> Plan:
    state = job._raw or {"id": job.id, "kind": job.kind, "status": job.status}
    final = build(Job, (yield Watch(state, progress, timeout, poll)), client)
    if final.status != "succeeded":
        reason = f": {final.error}" if final.error else ""
        raise JobFailed(f"job {final.id} ({final.kind}) {final.status}{reason}", final)
    return final


def _result(client: Any, job: Job, progress: Any, timeout: float | None) -> Plan:
    final = yield from _wait(client, job, progress, timeout, 1.0)
    attribute = {"train": "model_id", "embed": "embedding_set_id",
                 "ingest": "dataset_id"}.get(final.kind)
    if attribute is None:
        return final
    return (yield from _linked(client, final, attribute))


# How a job's result is fetched, by the job's attribute naming it: each resource module
# adds its getter when it is imported (they import this module, so this one cannot import
# them); the package imports them all before any job exists.
LINKED: dict[str, Callable[[Any, Any], Plan]] = {}


def _linked(client: Any, job: Job, attribute: str) -> Plan:
    value = getattr(job, attribute)
    if value is None:
        job = yield from _get_job(client, job.id)
        value = getattr(job, attribute)
    if value is None:
        what = attribute.removesuffix("_id").replace("_", " ")
        raise LatentbankError(f"job {job.id} ({job.kind}, {job.status}) has no {what}")
    return (yield from LINKED[attribute](client, value))


def _cancel(client: Any, job_id: int) -> Plan:
    response = yield Call("POST", f"/v1/jobs/{job_id}/cancel")
    return build(Job, response.json(), client)


class Jobs(Resource):
    """`client.jobs`: jobs by id, lists, cancellation."""

    def get(self, job_id: int) -> Job:
        """One job by id."""
        return self._run(_get_job(self._client, ident(job_id, "job_id")))

    def __getitem__(self, job_id: int) -> Job:
        return self.get(job_id)

    def list(self, status: str | None = None, kind: str | None = None,
             model_id: int | None = None, sweep_id: str | None = None, limit: int = 100,
             offset: int = 0) -> list[Job]:
        """Jobs, newest first, optionally of one status, kind, model or sweep."""
        def plan() -> Plan:
            response = yield Call("GET", "/v1/jobs", params={
                "status": status, "kind": kind, "model_id": model_id, "sweep_id": sweep_id,
                "limit": limit, "offset": offset})
            return [build(Job, j, self._client) for j in response.json()]
        return self._run(plan())

    def cancel(self, job_id: int) -> Job:
        """Ask a job to stop."""
        return self._run(_cancel(self._client, ident(job_id, "job_id")))

    def wait(self, job_id: int, progress: Any = False, timeout: float | None = None) -> Job:
        """Follow job `job_id` to its end (see `Job.wait`)."""
        def plan() -> Plan:
            job = yield from _get_job(self._client, ident(job_id, "job_id"))
            return (yield from _wait(self._client, job, progress, timeout, 1.0))
        return self._run(plan())
