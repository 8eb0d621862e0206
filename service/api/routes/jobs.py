"""Training and embedding submissions, jobs, cancellation, server-sent progress."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from models.config import VAEConfig
from models.transforms import range_problem
from service.api.auth import key_alive
from service.api.deps import Id, ReadKey, Services, SvcDep, WriteKey, in_thread
from service.api.error_responses import ERRORS
from service.api.schemas.jobs import (
    EmbeddingRequest,
    JobOut,
    SweepOut,
    SweepRequest,
    TrainingRequest,
)
from service.api.validation import sweep_configs, training_config
from store.aliases import resolve
from store.datasets import get_dataset
from store.errors import InvalidInput
from store.jobs import TERMINAL, get_job, list_jobs, request_cancel
from store.mlflow_sync import job_sync_state
from store.publishing import publish
from store.registry import get_model
from store.submit import leaderboard, submit_embedding, submit_sweep, submit_training
from store.tables import JOB_KINDS, JOB_STATUSES, Job

router = APIRouter(tags=["jobs"], responses=ERRORS)
IdempotencyKey = Header(None, alias="Idempotency-Key", max_length=200,
                        pattern=r"^[!-~]([ -~]*[!-~])?$",
                        description="repeat a submission safely: the same key with the "
                                    "same body answers with the job it created the first "
                                    "time; with another body, 422")


def _accepted(response: Response, job: Job, created: bool) -> JobOut:
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.of(job)


def _publish(svc: Services, job: Job, created: bool) -> Job:
    if created:
        svc.metrics.submissions.labels(job.kind).inc()
    if job.published_at is None and job.status == "queued":
        publish(svc.db, svc.sender, job)
        return get_job(svc.db, job.id)
    return job


def _request_hash(request: Request, body: Any) -> str:
    """What an Idempotency-Key is bound to: the route and the parsed body."""
    fields = body.model_dump(mode="json")
    if fields.get("vector_type", "") is None:  # as before the field existed: a retry of an
        del fields["vector_type"]              # older request keeps its key
    canonical = json.dumps([request.url.path, fields], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _idempotency_args(svc: Services, request: Request, body: Any, key: str | None,
                      ) -> dict[str, Any]:
    """The submission's arguments that make it safe to repeat: its Idempotency-Key bound to
    the request, and the attempt cap of its job."""
    if key is not None and (not key.strip() or not key.isprintable()):
        raise InvalidInput("Idempotency-Key must be 1-200 printable characters")
    return {"idempotency_key": key, "request_hash": _request_hash(request, body),
            "max_attempts": svc.settings.job_max_attempts}


@router.post("/v1/training-jobs", status_code=202, response_model=JobOut,
             summary="Train a VAE on a dataset (202: queued; follow the Location)")
def create_training_job(_: WriteKey, svc: SvcDep, request: Request, response: Response,
                        body: TrainingRequest,
                        idempotency_key: str | None = IdempotencyKey) -> JobOut:
    dataset = get_dataset(svc.db, body.dataset_id)
    config = training_config(dataset.item_shape, body.model, body.training,
                             (dataset.min_value, dataset.max_value))
    if body.registered_model:
        config["registered_model"] = body.registered_model
    job, created = submit_training(svc.db, body.dataset_id, config,
                                   **_idempotency_args(svc, request, body, idempotency_key))
    return _accepted(response, _publish(svc, job, created), created)


@router.post("/v1/sweeps", status_code=202, response_model=SweepOut,
             summary="A grid of training jobs under one sweep id")
def create_sweep(_: WriteKey, svc: SvcDep, request: Request, response: Response,
                 body: SweepRequest, idempotency_key: str | None = IdempotencyKey) -> SweepOut:
    dataset = get_dataset(svc.db, body.dataset_id)
    configs = sweep_configs(dataset.item_shape, body.model, body.training, body.grid,
                            (dataset.min_value, dataset.max_value),
                            max_configs=svc.settings.sweep_max_configs,
                            max_fields=svc.settings.sweep_max_fields)
    if body.registered_model:
        configs = [{**c, "registered_model": body.registered_model} for c in configs]
    sweep_id, jobs = submit_sweep(svc.db, body.dataset_id, configs,
                                  **_idempotency_args(svc, request, body, idempotency_key))
    published = [_publish(svc, job, True) for job in jobs]
    response.headers["Location"] = f"/v1/sweeps/{sweep_id}"
    return SweepOut(sweep_id=sweep_id, jobs=[JobOut.of(j) for j in published])


@router.get("/v1/sweeps/{sweep_id}", response_model=list[dict[str, Any]],
            summary="The sweep's models ranked by held-out log p(x)")
def sweep(_: ReadKey, svc: SvcDep, sweep_id: str) -> list[dict[str, Any]]:
    return leaderboard(svc.db, sweep_id)


@router.post("/v1/embedding-jobs", status_code=202, response_model=JobOut,
             summary="Embed a dataset with a ready model (202: queued)")
def create_embedding_job(_: WriteKey, svc: SvcDep, request: Request, response: Response,
                         body: EmbeddingRequest,
                         idempotency_key: str | None = IdempotencyKey) -> JobOut:
    model_id = resolve(svc.db, body.model_id, "model")
    set_id = None if body.embedding_set_id is None else resolve(
        svc.db, body.embedding_set_id, "embedding_set")
    _embedding_values(svc, model_id, body.dataset_id)
    vector_type = body.vector_type
    if set_id is None and vector_type is None:
        vector_type = svc.settings.default_vector_type
    job, created = submit_embedding(
        svc.db, model_id, body.dataset_id, body.importance_samples, embedding_set_id=set_id,
        vector_type=vector_type, **_idempotency_args(svc, request, body, idempotency_key))
    return _accepted(response, _publish(svc, job, created), created)


def _embedding_values(svc: Services, model_id: int, dataset_id: int) -> None:
    """Refuse at once a dataset whose stored value range the model's transform or
    likelihood cannot take, as training does (service.api.validation) and /score does per
    item; whether a dequantising model's data are integers the range cannot say, so the
    worker scans those before it writes a row (workers/embedding.py)."""
    dataset = get_dataset(svc.db, dataset_id)
    model = get_model(svc.db, model_id)
    problem = range_problem(dataset.min_value, dataset.max_value,
                            VAEConfig.from_dict(model.config["model"]))
    if problem is not None:
        raise InvalidInput(f"dataset {dataset_id} cannot be embedded with model {model_id}: "
                           f"{problem}")


@router.get("/v1/jobs", response_model=list[JobOut], summary="Jobs, newest first")
def jobs(_: ReadKey, svc: SvcDep,
         status: Literal[JOB_STATUSES] | None = None,
         kind: Literal[JOB_KINDS] | None = None,
         model_id: int | None = Query(None, ge=1, le=2**63 - 1),
         sweep_id: str | None = Query(None, max_length=200),
         limit: int = Query(100, ge=1, le=1000),
         offset: int = Query(0, ge=0, le=2**62)) -> list[JobOut]:
    rows = list_jobs(svc.db, status=status, kind=kind, model_id=model_id, sweep_id=sweep_id,
                     limit=limit, offset=offset)
    return [JobOut.of(j) for j in rows]


@router.get("/v1/jobs/{job_id}", response_model=JobOut)
def job(_: ReadKey, svc: SvcDep, job_id: Id) -> JobOut:
    row = get_job(svc.db, job_id)
    out = JobOut.of(row)
    if row.kind == "train":
        out.mlflow = job_sync_state(svc.db, row.id)
    return out


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobOut,
             summary="Cancel: a queued job never starts, a running one stops at its next "
                     "check (409 when it has already ended)")
def cancel_job(_: WriteKey, svc: SvcDep, job_id: Id) -> JobOut:
    return JobOut.of(request_cancel(svc.db, job_id))


def _event(name: str, data: dict[str, Any], event_id: int) -> bytes:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def _events(svc: Services, job_id: int, first: Job,
                  digest: str | None = None) -> AsyncIterator[bytes]:
    """A `progress` event whenever the job changes, then `end` once it has ended. The
    stream ends early, with a comment saying why, once its key (`digest`) is revoked:
    checked every poll, from the verified-key cache (10 s; a key revoked through this API
    leaves it at once), else the keys table."""
    seen, count, last_sent = None, 0, time.monotonic()
    job = first
    while True:
        out = JobOut.of(job).model_dump(mode="json")
        state = (out["status"], out["progress"], out["progress_message"], out["attempts"])
        if state != seen:
            seen, count, last_sent = state, count + 1, time.monotonic()
            yield _event("progress", out, count)
        if job.status in TERMINAL:
            yield _event("end", out, count + 1)
            return
        if time.monotonic() - last_sent > 15:  # a comment keeps proxies from timing out
            last_sent = time.monotonic()
            yield b": keep-alive\n\n"
        await asyncio.sleep(svc.settings.sse_poll_seconds)
        if digest is not None and not await key_alive(svc, digest):
            yield b": the API key was revoked\n\n"
            return
        job = await in_thread(get_job, svc.db, job_id)


@router.get("/v1/jobs/{job_id}/events",
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "`progress` events (the job as JSON), then "
                                            "`end`"}},
            response_class=StreamingResponse,
            summary="Server-sent progress events until the job ends")
async def job_events(_: ReadKey, svc: SvcDep, request: Request, job_id: Id,
                     ) -> StreamingResponse:
    first = await in_thread(get_job, svc.db, job_id)  # 404 before the stream starts
    digest = (request.scope.get("state") or {}).get("key_hash")
    return StreamingResponse(_events(svc, job_id, first, digest),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
