"""Health, readiness, Prometheus metrics (open), and API keys (admin)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from service.deps import Id, Services, in_thread, require, services
from service.routes.datasets import ERRORS
from service.schemas import CreatedKeyOut, Health, KeyOut, KeyRequest
from store.broker import broker_ping
from store.errors import Conflict
from store.keys import create_key, list_keys, revoke_key

router = APIRouter(tags=["operations"])
READY_TIMEOUT = 2.0  # seconds each readiness probe may take; they run side by side


def database_ping(svc: Services) -> None:
    with svc.db.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            summary="The database and the broker answer (each within 2 s)")
async def readyz(request: Request) -> JSONResponse:
    svc = services(request)
    limit = READY_TIMEOUT

    async def probe(fn: Any) -> str:
        try:
            await asyncio.wait_for(in_thread(fn), limit)
            return "ok"
        except TimeoutError:
            return f"unavailable (no answer within {limit:g} s)"
        except Exception as exc:
            return f"unavailable ({type(exc).__name__})"

    results = await asyncio.gather(probe(lambda: database_ping(svc)),
                                   probe(lambda: broker_ping(svc.settings.broker_url, limit)))
    checks = dict(zip(("database", "broker"), results, strict=True))
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(Health(status="ok" if ok else "unavailable", checks=checks).model_dump(),
                        status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}},
            summary="Prometheus metrics: request latency, jobs by status, decode batch sizes")
async def metrics(request: Request) -> Response:
    data = await in_thread(services(request).metrics.render)
    return Response(data, media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/keys", status_code=201, response_model=CreatedKeyOut,
             dependencies=[require("admin")], responses=ERRORS, tags=["keys"],
             summary="Create an API key (the secret is shown once)")
async def new_key(request: Request, body: KeyRequest) -> CreatedKeyOut:
    svc = services(request)
    created = await in_thread(create_key, svc.db, body.name, list(body.scopes))
    return CreatedKeyOut(id=created.id, name=created.name, prefix=created.prefix,
                         scopes=created.scopes, key=created.key)


@router.get("/v1/keys", response_model=list[KeyOut], dependencies=[require("admin")],
            responses=ERRORS, tags=["keys"])
async def keys(request: Request) -> list[KeyOut]:
    return [KeyOut.of(k) for k in await in_thread(list_keys, services(request).db)]


@router.delete("/v1/keys/{key_id}", response_model=KeyOut, dependencies=[require("admin")],
               responses=ERRORS, tags=["keys"], summary="Revoke a key")
async def revoke(request: Request, key_id: Id) -> KeyOut:
    svc = services(request)
    if key_id == getattr(request.state, "key_id", None):
        raise Conflict(f"key {key_id} is the one making this request; revoke it with "
                       "another admin key (so no one locks themselves out by mistake)")
    revoked = await in_thread(revoke_key, svc.db, key_id)
    svc.keys.clear()
    return KeyOut.of(revoked)
