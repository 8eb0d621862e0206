"""Health, readiness, Prometheus metrics (open), and API keys (admin)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from service.deps import Id, Services, in_thread, require, services
from service.routes.datasets import ERRORS
from service.schemas import CreatedKeyOut, Health, KeyOut, KeyRequest
from store.keys import create_key, list_keys, revoke_key

router = APIRouter(tags=["operations"])


def broker_ping(url: str, timeout: float = 2.0) -> None:
    import redis

    if url.startswith("redis+socket://"):
        client = redis.Redis(unix_socket_path=url[len("redis+socket://"):],
                             socket_timeout=timeout, socket_connect_timeout=timeout)
    else:
        client = redis.Redis.from_url(url, socket_timeout=timeout,
                                      socket_connect_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


def database_ping(svc: Services) -> None:
    with svc.db.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            summary="The database and the broker answer")
async def readyz(request: Request) -> JSONResponse:
    svc = services(request)
    checks = {}
    for name, probe in (("database", lambda: database_ping(svc)),
                        ("broker", lambda: broker_ping(svc.settings.broker_url))):
        try:
            await in_thread(probe)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable ({type(exc).__name__})"
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
    revoked = await in_thread(revoke_key, svc.db, key_id)
    svc.keys.clear()
    return KeyOut.of(revoked)
