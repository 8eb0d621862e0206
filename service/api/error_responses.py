"""The error answers routes declare for OpenAPI: every router's, and the serving routes'."""

from __future__ import annotations

from typing import Any

from service.api.schemas.common import ErrorBody

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 413, 415, 422)}
SERVE_ERRORS = {**ERRORS, 406: ERRORS[409], 503: ERRORS[409]}
