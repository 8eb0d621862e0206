"""The FastAPI app factory: `uvicorn --factory service.api.app:create_app`.

Imports neither torch nor `workers/`: submissions write job rows (store.submit) and send
Celery tasks by name; serving runs the exported ONNX files with onnxruntime.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from service.api import errors
from service.api.auth import Authenticate
from service.api.broker import task_sender
from service.api.deps import Services
from service.api.errors import BodyTooLarge
from service.api.fastpath import FastDecode
from service.api.inference import BatchPolicy, Inference, SessionCache
from service.api.metrics import Metrics, RequestMetrics
from service.api.routes import aliases, datasets, embeddings, jobs, keys, models, ops, serving
from store.db import Database, statement_timeout
from store.jobs import count_jobs
from store.leftovers import sweep_leftovers
from store.replicas import Reads
from store.settings import Settings, get_settings, open_artifacts

log = logging.getLogger("latentbank.api")

DESCRIPTION = """
Train Variational Autoencoders on your datasets, store their latent codes and ELBO terms
in PostgreSQL/pgvector, search them, and call the ONNX decoders.

Every `/v1` route needs `Authorization: Bearer <key>` (create one with
`latentbank keys create`); scopes are `read` < `write` < `admin`. The key is checked
before the body is read. Each key has a rate, a number of requests in progress and of
event streams open (429 with `Retry-After` past them). Errors are
`{"error": {"code", "message"}}`. Bounds are in nats per item; higher is better.
"""


class BodyLimit:
    """Refuses bodies over the limit (413): by Content-Length up front, and by counting
    the bytes received, which also holds for chunked bodies that name no length."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app, self.settings = app, settings

    def limit_for(self, scope: dict[str, Any]) -> tuple[int, str]:
        """The byte limit of this request's body, and the setting that sets it."""
        if scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/datasets":
            return self.settings.max_upload_bytes, "LATENTBANK_MAX_UPLOAD_BYTES"
        kind = next((v for k, v in scope.get("headers", ()) if k == b"content-type"), b"")
        if kind.split(b";")[0].strip().lower() in (b"", b"application/json") and (
                self.settings.max_json_bytes < self.settings.max_request_bytes):
            # parsed JSON costs about 17 bytes of Python objects per byte of numbers
            return self.settings.max_json_bytes, "LATENTBANK_MAX_JSON_BYTES"
        return self.settings.max_request_bytes, "LATENTBANK_MAX_REQUEST_BYTES"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    response = errors.error_response(
                        413, "too_large", str(BodyTooLarge(limit, setting)),
                        {"Connection": "close"})
                    await response(scope, receive, send)
                    return
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        await self.app(scope, counted, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if not settings.database_url:
        raise RuntimeError("LATENTBANK_DATABASE_URL is not set: `latentbank up` starts the "
                           "embedded database and sets it for the API")
    engine_options: dict[str, Any] = {
        "connect_args": {"connect_timeout": settings.db_connect_timeout,
                         **statement_timeout(settings.db_statement_timeout_ms)},
        "pool_timeout": settings.db_connect_timeout}
    db = Database(settings.database_url, **engine_options)
    reads = Reads.of(db, settings.database_read_url, settings.database_read_max_lag_s,
                     settings.database_read_check_s, **engine_options)
    artifacts = open_artifacts(settings)
    metrics = Metrics(lambda: count_jobs(db), reads)
    sessions = SessionCache(artifacts, str(settings.cache_dir / "onnx"), settings.onnx_sessions,
                            settings.onnx_threads)
    inference = Inference(sessions, BatchPolicy(settings.decode_max_batch_rows,
                                                settings.decode_max_delay_ms / 1000,
                                                settings.decode_batching,
                                                settings.decode_inline_max_ms / 1000),
                          observer=metrics.observer)
    sender = task_sender(settings.broker_url, settings.visibility_timeout)
    svc = Services(settings, db, artifacts, sender, inference, metrics, reads)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        log.info("api starting database=%s artifacts=%s", db.engine.url.render_as_string(),
                 settings.artifacts_url.split("://", 1)[0])
        _report_pgvector(db)
        for replica in reads.replicas:
            log.info("read replica %s (skipped while more than %g s behind)",
                     replica.name, settings.database_read_max_lag_s)
        reads.start()
        for path in sweep_leftovers(settings.data_dir / "uploads", artifacts.local_path("tmp")
                                    if artifacts.is_local else None):
            log.info("removed a leftover of an interrupted upload: %s", path)
        yield
        inference.close()
        reads.close()
        db.dispose()

    # /docs is served below from the package's own Swagger UI; no ReDoc (it needs a CDN)
    app = FastAPI(title="latentbank", version=_version(), description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None,
                  **_telemetry(settings.opentelemetry))
    app.state.services = svc
    errors.install(app)
    for module in (ops, keys, datasets, jobs, models, serving, embeddings, aliases):
        app.include_router(module.router)
    _mount_ui(app)
    _register_body_schemas(app)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(FastDecode, services=svc)  # see service/api/fastpath.py
    # outermost: no layer inside it receives a body before the key is checked
    app.add_middleware(Authenticate, services=svc, routes=app.router.routes)
    return app


def _telemetry(enabled: bool) -> dict[str, Any]:
    """FastAPI's native OpenTelemetry (FastAPI >= 0.16x) off unless asked for: with no
    provider configured it only costs each request a check for one (about 20 us of the
    decode hot path here). Older FastAPI has none to turn off."""
    if enabled or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False,
                          "operation_spans": False}}


UI_DIR = Path(__file__).parent / "ui"
UI_HEADERS = {
    # the page loads only its own files and talks only to this API
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                               "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class UiFiles(StaticFiles):
    """The web UI's files (shipped in the package: no CDN, no build step)."""

    async def get_response(self, path: str, scope: Any) -> Any:
        response = await super().get_response(path, scope)
        response.headers.update(UI_HEADERS)
        response.headers["Cache-Control"] = "no-cache"
        return response


# Swagger UI from ui/vendor (swagger-ui-dist, with its licence) and an init script of
# its own: nothing from another origin, no inline script, the UI's policy.
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>latentbank API</title>
<link rel="stylesheet" href="ui/vendor/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="ui/vendor/swagger-ui-bundle.js"></script>
<script src="ui/docs.js"></script></body></html>
"""


def _mount_ui(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    @app.get("/ui", include_in_schema=False)
    async def to_ui() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(DOCS_PAGE, headers={**UI_HEADERS, "Cache-Control": "no-cache"})

    app.mount("/ui/", UiFiles(directory=UI_DIR, html=True), name="ui")


def _report_pgvector(db: Database) -> None:
    """Say at start what the database's pgvector allows (a database that is down now is
    reported when it answers: the version is read on first use)."""
    from store.search import ITERATIVE_SCANS

    try:
        version = db.pgvector()
    except Exception as exc:
        log.warning("pgvector version unknown (database unavailable: %s)", type(exc).__name__)
        return
    shown = ".".join(map(str, version))
    if version >= ITERATIVE_SCANS:
        log.info("pgvector %s: filtered searches may use HNSW iterative scans", shown)
    else:
        log.warning("pgvector %s has no iterative index scans: filtered searches run exact "
                    "(pgvector >= 0.8 is recommended)", shown)


def _register_body_schemas(app: FastAPI) -> None:
    """Bodies that routes read by hand (multipart or JSON, JSON or .npy) are declared in
    `openapi_extra` by reference: put their models in the schema's components, so the
    references resolve for clients and generators."""
    from fastapi.openapi.utils import get_openapi

    from service.api.schemas.datasets import DatasetByReference
    from service.api.schemas.embeddings import SearchRequest
    from service.api.schemas.serving import DecodeRequest, EncodeRequest

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (DatasetByReference, DecodeRequest, EncodeRequest, SearchRequest):
                found = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(found.pop("$defs", {}))
                components[model.__name__] = found
            _document_auth_answers(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_auth_answers(schema: dict[str, Any]) -> None:
    """What the Authenticate middleware may answer on any /v1 operation, whatever the
    route declares: 401 (no valid key) and 429 (a limit of the key or of the address)."""
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith("/v1/"):
            continue
        for operation in operations.values():
            answers = operation.setdefault("responses", {})
            answers.setdefault("401", {"description": "no valid API key",
                                       "content": {"application/json": {"schema": error}}})
            answers.setdefault("429", {
                "description": "over a limit of the key (rate, requests in progress, event "
                               "streams) or of the address (failed authentications); "
                               "Retry-After says when to try again",
                "headers": {"Retry-After": {"schema": {"type": "integer"},
                                            "description": "seconds to wait"}},
                "content": {"application/json": {"schema": error}}})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("latentbank")
    except PackageNotFoundError:
        return "0+unknown"
