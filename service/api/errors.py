"""Every error leaves the API as `{"error": {"code", "message"}}` with a fitting status.

Messages name what is wrong in the request; they never carry paths, SQL or stack traces
(the data layer's messages are written for users; anything unexpected becomes a generic
500 whose details go to the log only).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from store.db import DRIVER_ERRORS, store_error_of
from store.errors import (
    Conflict,
    DatabaseOutage,
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
    StatementTimeout,
    StoreError,
    TooLarge,
    UnsupportedFormat,
)

log = logging.getLogger(__name__)

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
              413: "too_large", 415: "unsupported_media_type", 422: "invalid_input",
              503: "unavailable"}


class ApiError(Exception):
    """An error raised by the API layer itself."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.code = code or HTTP_CODES.get(status, "error")
        self.headers = headers


class BodyTooLarge(Exception):
    """Raised while a body is read, once it has passed its limit (413)."""

    def __init__(self, limit: int, setting: str = "LATENTBANK_MAX_REQUEST_BYTES") -> None:
        hint = ("; send arrays as .npy (application/x-npy)"
                if setting == "LATENTBANK_MAX_JSON_BYTES" else "")
        super().__init__(f"the request body exceeds the limit of {limit} bytes ({setting})"
                         f"{hint}")
        self.limit = limit


STATUSES: tuple[tuple[type[StoreError], int], ...] = (
    (UnsupportedFormat, 415), (TooLarge, 413), (InvalidInput, 422), (NotFound, 404),
    (Conflict, 409), (DatabaseUnavailable, 503))


def status_of(exc: StoreError) -> int:
    """The first match in STATUSES (subclasses come before their bases); else 422."""
    return next((status for cls, status in STATUSES if isinstance(exc, cls)), 422)


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def describe_validation(errors: list[dict[str, Any]]) -> str:
    """pydantic's errors as one line: `model.latent_dim: Input should be ...; ...`."""
    shown = [f"{_location(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}"
             for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(shown) + more


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


RETRY = {"Retry-After": "5"}


def store_answer(request: Request, exc: StoreError) -> JSONResponse:
    """A store error's answer: its status, code and message; an outage or a statement
    timeout says when to try again."""
    if isinstance(exc, StatementTimeout):  # not an outage: this request's query ran too long
        limit = request.app.state.services.settings.db_statement_timeout_ms
        log.warning("statement timeout (%d ms) on %s %s", limit, request.method,
                    request.url.path)
        return error_response(503, exc.code,
                              f"the database query took longer than {limit} ms and was "
                              "cancelled (LATENTBANK_DB_STATEMENT_TIMEOUT_MS); ask for "
                              "less, or try again when the server is less busy", RETRY)
    if isinstance(exc, DatabaseOutage):
        log.warning("database unavailable: %s", type(exc.__cause__ or exc).__name__)
        return error_response(503, exc.code, str(exc), RETRY)
    status = status_of(exc)
    if status == 503:
        log.warning("database unavailable: %s", exc)
    return error_response(status, exc.code, str(exc))


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(413, "too_large", str(exc), {"Connection": "close"})

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError) -> JSONResponse:
        return store_answer(request, exc)

    async def _driver(request: Request, exc: Exception) -> JSONResponse:
        # the data layer says what a driver error means (store.db.store_error_of)
        found = store_error_of(exc)
        if found is None:
            log.error("database error", exc_info=exc)
            return error_response(500, "internal", "internal error; see the server log")
        if isinstance(found, InvalidInput):
            log.warning("database refused a value: %s", str(exc).splitlines()[0])
        return store_answer(request, found)

    for driver_error in DRIVER_ERRORS:
        app.add_exception_handler(driver_error, _driver)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_input", describe_validation(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode
            return error_response(422, "invalid_input", "the body is not valid UTF-8 JSON")
        if exc.status_code == 405:  # Starlette names only the first route's methods
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(exc.status_code, HTTP_CODES.get(exc.status_code, "error"),
                              message, headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", "internal error; see the server log")
