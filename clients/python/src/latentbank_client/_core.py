"""What the sync and async clients share: the operations a call is made of, the retry
policy, the event-stream parser, the progress display and the .npy codec.

Every public method is written once, as a *plan*: a generator that yields operations
(`Call`, `Download`, `Watch`) and receives their results; `Client` runs plans with
httpx.Client, `AsyncClient` with httpx.AsyncClient. Only the running differs.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx
import numpy as np

from latentbank_client.errors import InvalidInput

NPY = "application/x-npy"
TERMINAL = ("succeeded", "failed", "cancelled")
Opener = Callable[[], Any]  # a fresh body part per attempt: bytes or an open file


@dataclass
class Call:
    """One HTTP request. `safe`: repeating it cannot do anything twice, so a connection
    broken after sending is retried. By default only GET/HEAD and submissions carrying an
    Idempotency-Key are; a POST that only computes (search, decode, encode, sample...)
    says safe=True. Every other call (DELETE, PUT of an alias, a job's cancel, a key's
    creation) is not retried once sent: if the server acted before the break, a retry
    would report a false failure (a DELETE's 404, a cancel's 409), so the broken
    connection is reported instead (ConnectionFailed: the outcome is unknown). A 404 on a
    retried DELETE is not taken as success: it cannot tell our delete from someone
    else's, or from an id that never existed."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    files: dict[str, tuple[str, Opener, str]] | None = None
    data: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float | str | None = "default"
    safe: bool | None = None

    def __post_init__(self) -> None:
        if self.safe is None:
            self.safe = self.method in ("GET", "HEAD") or "Idempotency-Key" in self.headers

    def request_kwargs(self) -> tuple[dict[str, Any], list[Any]]:
        """httpx.request's arguments for one attempt, and the files it opened."""
        kwargs: dict[str, Any] = {"headers": self.headers}
        if self.params:
            kwargs["params"] = {k: v for k, v in self.params.items() if v is not None}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.content is not None:
            kwargs["content"] = self.content
        if self.data:
            kwargs["data"] = self.data
        opened: list[Any] = []
        if self.files:
            parts = {}
            for name, (filename, opener, ctype) in self.files.items():
                body = opener()
                if hasattr(body, "close"):
                    opened.append(body)
                parts[name] = (filename, body, ctype)
            kwargs["files"] = parts
        if self.timeout is None:  # long uploads and downloads: no read or write limit
            kwargs["timeout"] = httpx.Timeout(None, connect=30.0, pool=30.0)
        elif self.timeout != "default":
            kwargs["timeout"] = self.timeout
        return kwargs, opened


@dataclass
class Download:
    """A streamed GET whose body is written to `sink` (rewound on a retry)."""

    call: Call
    sink: IO[bytes]


@dataclass
class Watch:
    """Follow job `job` (its JSON) to its end; answers the final JSON."""

    job: dict[str, Any]
    progress: Any = False
    timeout: float | None = None
    poll: float = 1.0


Plan = Generator[Any, Any, Any]


def submission(headers: dict[str, str] | None, idempotency_key: str | None) -> dict[str, str]:
    """Headers of a submission: an Idempotency-Key (the one given, else a fresh uuid4)
    that the client's own retries reuse, so a retry never makes a second job."""
    return {**(headers or {}), "Idempotency-Key": idempotency_key or str(uuid.uuid4())}


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential back-off.

    A request is tried at most `attempts` times. Retried: a connection that could not be
    made (always), a connection broken after sending (only `safe` calls), and 429/503
    answers. The wait before retry n (0-based) is `backoff * 2**n` capped at
    `max_backoff`, or the answer's Retry-After when it gives one; a Retry-After above
    `max_retry_after` is not waited for (the error is raised at once)."""

    attempts: int = 4
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retrying after failed attempt `attempt` (0-based), or
        None when no retry is left or the server asks for too long a wait."""
        if attempt + 1 >= self.attempts:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        return min(self.max_backoff, self.backoff * 2 ** attempt)

    def retries_transport(self, call: Call, exc: Exception) -> bool:
        """Whether a transport error may be retried: the request surely never reached
        the server, or repeating it is harmless."""
        return call.safe or isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


RETRY_STATUSES = (429, 503)


class EventParser:
    """Server-sent events, line by line: `feed` answers (event, data) when one ends."""

    def __init__(self) -> None:
        self.event: str | None = None
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, Any] | None:
        if line == "":
            if not self.data:
                self.event = None
                return None
            event, data = self.event or "message", "\n".join(self.data)
            self.event, self.data = None, []
            try:
                return event, json.loads(data)
            except ValueError:
                return None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


class Progress:
    """A job's progress shown while waiting: a tqdm bar when tqdm is installed (and
    LATENTBANK_NO_TQDM is unset), else one plain line per change (at most one a second)
    on stderr; `progress` may also be a callable given each state (a dict)."""

    def __init__(self, progress: Any, stream: IO[str] | None = None) -> None:
        self.callback = progress if callable(progress) else None
        self.enabled = bool(progress)
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self.last: tuple[Any, ...] | None = None
        self.last_line = 0.0

    def update(self, job: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback(job)
            return
        if not self.enabled:
            return
        done = round(100 * float(job.get("progress") or 0), 1)
        note = job.get("progress_message") or ""
        state = (job.get("status"), done, note)
        if state == self.last:
            return
        changed_status = self.last is None or self.last[0] != state[0]
        self.last = state
        if self.bar is None and not os.environ.get("LATENTBANK_NO_TQDM"):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.bar = False
            else:
                self.bar = tqdm(total=100.0, desc=f"job {job['id']} ({job['kind']})",
                                bar_format="{l_bar}{bar}| [{elapsed}<{remaining}{postfix}]")
        if self.bar:
            self.bar.n = done
            short = note if len(note) <= 60 else note[:59] + "…"
            self.bar.set_postfix_str(f"{job.get('status')} {short}".strip(), refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if changed_status or now - self.last_line >= 1.0 or job.get("status") in TERMINAL:
            self.last_line = now
            print(f"job {job['id']} ({job['kind']}): {job.get('status')} {done:.0f}%"
                  + (f" {note}" if note else ""), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


class Deadline:
    """A wait's end (None: no end)."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end


# -- arrays ----------------------------------------------------------------------------

def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as an .npy file (numpy.save, no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def float_rows(value: Any, what: str, width: int | None = None) -> np.ndarray:
    """`value` as a float32 array of rows (a single row or item becomes one row when
    `width` tells); InvalidInput naming `what` when it is not numeric."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what} must be a numeric array; got {type(value).__name__}") \
            from None
    if array.ndim == 0:
        raise InvalidInput(f"{what} must be an array of rows, not a scalar")
    if width is not None and array.ndim == 1:
        array = array[None]
    if width is not None and (array.ndim != 2 or array.shape[1] != width):
        raise InvalidInput(f"{what} must have shape (n, {width}); got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise InvalidInput(f"{what} holds NaN or infinite values")
    return array


def side_array(value: Any, what: str, n_items: int | None) -> bytes:
    """Labels or keys (a sequence, an array, or an .npy path) as .npy bytes: numbers or
    fixed-width strings, one per item."""
    if isinstance(value, str | os.PathLike):
        return Path(value).read_bytes()
    array = np.asarray(value)
    if array.dtype == object:
        array = array.astype(str)
    if array.ndim != 1:
        raise InvalidInput(f"{what} must be one-dimensional (one per item); got shape "
                           f"{list(array.shape)}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype.kind in "USb"):
        raise InvalidInput(f"{what} must be numbers or strings; got dtype {array.dtype}")
    if n_items is not None and len(array) != n_items:
        raise InvalidInput(f"{what} has {len(array)} entries for {n_items} items")
    return npy_bytes(array)


def ref(value: Any, what: str) -> str:
    """A path segment naming a model or set: an id, an object with `.id`, or '@alias'."""
    if hasattr(value, "id") and not isinstance(value, str | int):
        value = value.id
    if isinstance(value, bool):
        raise InvalidInput(f"{what} must be an id or '@alias'; got {value!r}")
    if isinstance(value, int | np.integer) and value >= 1:
        return str(int(value))
    if isinstance(value, str) and value.isdigit() and int(value) >= 1:
        return value
    if isinstance(value, str) and value.startswith("@") and len(value) > 1:
        return "@" + quote(value[1:], safe="")  # one path segment, whatever the name holds
    raise InvalidInput(f"{what} must be a positive id or '@alias'; got {value!r}")


def ident(value: Any, what: str) -> int:
    """A positive integer id (or an object's `.id`)."""
    if hasattr(value, "id") and not isinstance(value, str | int):
        value = value.id
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InvalidInput(f"{what} must be a positive integer id; got {value!r}")
    return int(value)
