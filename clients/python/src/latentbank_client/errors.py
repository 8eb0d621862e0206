"""One exception hierarchy: every failure a call can meet is a `LatentbankError`.

The API answers errors as `{"error": {"code", "message"}}` with a fitting status; each
status maps to one class here (`error_for`). Arguments the client itself refuses (before
any request) raise `InvalidInput` too, which is also a `ValueError`.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx


class LatentbankError(Exception):
    """A failed call. `status` is the HTTP status (None when no answer came), `code` the
    API's error code (`not_found`, `invalid_input`, ...), `message` its message."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 response: httpx.Response | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.response = response

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        return f"{self.message} ({self.status} {self.code or 'error'})"


class InvalidInput(LatentbankError, ValueError):
    """The request was refused as malformed (400, 406, 415, 422), or the client refused
    an argument before sending anything (`status` None)."""


class Unauthorized(LatentbankError):
    """401: no key, or an unknown or revoked one."""


class Forbidden(LatentbankError):
    """403: the key lacks the scope the route needs (read, write, admin)."""


class NotFound(LatentbankError):
    """404: no such dataset, job, model, embedding set, item, alias or key."""


class Conflict(LatentbankError):
    """409: the resource is not in a state for this (a model not ready, a job ended...)."""


class TooLarge(LatentbankError):
    """413: the request or its answer passes a limit of the server (the message names
    the setting)."""


class RateLimited(LatentbankError):
    """429: over a limit of the key or of the address; `retry_after` seconds to wait."""

    def __init__(self, message: str, *, retry_after: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Unavailable(LatentbankError):
    """503: the database or broker is unavailable, or a query ran past its time;
    `retry_after` seconds to wait when the server said."""

    def __init__(self, message: str, *, retry_after: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(LatentbankError):
    """Any other 5xx: an internal error of the server (its log has the details)."""


class ConnectionFailed(LatentbankError):
    """The API could not be reached (or the connection broke) after the retries."""


class UnreadableAnswer(LatentbankError):
    """A success answer (2xx) the client could not read: not the API's JSON or .npy (a
    proxy's or another server's page at that URL, a truncated body). `status` is the
    answer's status (None when it came while following a job)."""


class JobFailed(LatentbankError):
    """A job the client waited for ended `failed` or `cancelled`; `job` is its last state
    (`job.error` the worker's reason)."""

    def __init__(self, message: str, job: Any) -> None:
        super().__init__(message)
        self.job = job


class WaitTimeout(LatentbankError, TimeoutError):
    """`Job.wait(timeout=...)` ran out of time; the job goes on on the server."""


BY_STATUS: dict[int, type[LatentbankError]] = {
    400: InvalidInput, 401: Unauthorized, 403: Forbidden, 404: NotFound, 406: InvalidInput,
    409: Conflict, 413: TooLarge, 415: InvalidInput, 422: InvalidInput, 429: RateLimited,
    503: Unavailable}


def retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (a number or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_for(response: httpx.Response, hint: str = "") -> LatentbankError:
    """The exception for an error answer (its body read), of the class its status maps to."""
    status = response.status_code
    code, message = None, ""
    try:
        body = response.json()
        code, message = body["error"]["code"], str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()
        message = text.splitlines()[0][:500] if text else response.reason_phrase
    message = (message or response.reason_phrase) + hint
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else LatentbankError)
    kwargs: dict[str, Any] = {"status": status, "code": code, "response": response}
    if cls in (RateLimited, Unavailable):
        kwargs["retry_after"] = retry_after(response)
    return cls(message, **kwargs)
