"""What every route needs: the process's services, API-key auth, body codecs."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import numpy as np
import orjson
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from service.api.errors import ApiError, describe_validation
from service.api.inference import Inference
from service.api.metrics import Metrics
from store.artifacts import ArtifactStore
from store.db import Database
from store.errors import InvalidInput
from store.publishing import TaskSender
from store.settings import Settings

log = logging.getLogger("latentbank.api")
NPY = "application/x-npy"
Body = TypeVar("Body", bound=BaseModel)


class TTLCache:
    """A small dict whose entries expire: hot paths skip a database round trip."""

    def __init__(self, seconds: float, capacity: int = 10_000) -> None:
        self.seconds, self.capacity = seconds, capacity
        self._items: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any) -> Any:
        hit = self._items.get(key)
        if hit is None or hit[0] < time.monotonic():
            self._items.pop(key, None)
            return None
        return hit[1]

    def put(self, key: Any, value: Any) -> None:
        if len(self._items) >= self.capacity:
            self._items.clear()
        self._items[key] = (time.monotonic() + self.seconds, value)

    def pop(self, key: Any) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()


@dataclass
class Services:
    settings: Settings
    db: Database
    artifacts: ArtifactStore
    sender: TaskSender  # publishes job tasks (store.jobs.publish)
    inference: Inference
    metrics: Metrics
    # verified keys: (id, scopes) by the secret's hash. A key revoked by another process
    # stops working within `seconds`; one revoked through this API at once.
    keys: TTLCache = field(default_factory=lambda: TTLCache(10.0))
    # keys verified in the last 10 minutes (by hash): the failed-authentication limit of
    # their address does not stop their next lookup (service/api/auth.py)
    good_keys: TTLCache = field(default_factory=lambda: TTLCache(600.0))
    # unknown or revoked keys (by hash): refused again without a lookup
    unknown_keys: TTLCache = field(default_factory=lambda: TTLCache(60.0))
    # ready models (a ready model's files never change): skip a query per decode
    ready_models: TTLCache = field(default_factory=lambda: TTLCache(30.0))


def services(request: Request) -> Services:
    return request.app.state.services


bearer = HTTPBearer(auto_error=False, description="an API key from `latentbank keys create`")


def require(scope: str) -> Any:
    """A dependency: the caller's key, which must hold `scope` (401 / 403 otherwise).

    The key was verified before the body was read, by the Authenticate middleware
    (service/api/auth.py), which also checks this scope there; this reads what it found
    (no second lookup), and declares the bearer scheme for OpenAPI."""

    async def check(request: Request,
                    credentials: Annotated[HTTPAuthorizationCredentials | None,
                                           Depends(bearer)]) -> int:
        state = request.scope.get("state") or {}
        key_id = state.get("key_id")
        if key_id is None:  # no verified key: never served without one
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        if scope not in state["scopes"]:
            raise ApiError(403, f"this API key lacks the '{scope}' scope")
        return key_id

    check.__name__ = f"require_{scope}"
    check.required_scope = scope  # type: ignore[attr-defined]  # read by auth.scope_table
    return Depends(check)


async def read_body(request: Request) -> bytes:
    return await request.body()


def parse_json(raw: bytes, model: type[Body]) -> Body:
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":
            raise InvalidInput("the body is not valid JSON") from None
        raise InvalidInput(describe_validation(list(errors))) from None


# The header numpy writes for a plain little-endian array: parsed by one regex instead of
# `ast.literal_eval` (np.load's way), which costs more than a batch-1 decode.
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<|][fiub][1248])', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \} *\n")
_NPY_MAGIC = b"\x93NUMPY"


def _fast_npy(raw: bytes) -> np.ndarray | None:
    """A view (no copy) of an .npy body in numpy's own layout, or None for anything else
    (np.load then decides)."""
    if raw[:6] != _NPY_MAGIC or len(raw) < 10:
        return None
    if raw[6] == 1:
        start = 10 + int.from_bytes(raw[8:10], "little")
    elif raw[6] in (2, 3):
        start = 12 + int.from_bytes(raw[8:12], "little")
    else:
        return None
    found = _NPY_HEADER.fullmatch(raw, 10 if raw[6] == 1 else 12, start)
    if found is None:
        return None
    dims = [d for d in found[2].split(b",") if d.strip()]
    shape = tuple(int(d) for d in dims)
    dtype = np.dtype(found[1].decode())
    count = math.prod(shape)
    if len(raw) - start != count * dtype.itemsize:
        return None
    return np.frombuffer(raw, dtype, count, start).reshape(shape)


_ZIP_MAGIC = b"PK"  # a local file header (PK\x03\x04) or an empty archive (PK\x05\x06)


def load_npy(raw: bytes, what: str) -> np.ndarray:
    """An `.npy` body: numeric, no pickles; read without a copy (a view of the body).

    The header is read and checked before anything is allocated: a zip archive (`.npz`,
    which np.load would open as an archive), an object or structured dtype, and a declared
    shape whose bytes differ from the body's (a header can announce terabytes in a few
    bytes) are each refused with a 422."""
    fast = _fast_npy(raw)
    if fast is not None:
        return fast
    if raw[:2] == _ZIP_MAGIC:
        raise InvalidInput(f"'{what}': an .npy body was expected, got a zip (.npz) archive; "
                           "send one array as written by numpy.save")
    if raw[:6] != _NPY_MAGIC:
        raise InvalidInput(f"'{what}' is not a valid .npy array (it does not start with "
                           "numpy's magic bytes)")
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"version {version}")
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)  # 3.0: the same, in UTF-8
        shape, fortran_order, dtype = read(stream)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError):
        raise InvalidInput(f"'{what}' is not a valid .npy array (unreadable header)") from None
    if dtype.hasobject:
        raise InvalidInput(f"'{what}' is not a valid .npy array (object arrays are refused)")
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise InvalidInput(f"'{what}' must be numeric; got dtype {dtype}")
    count = math.prod(shape)
    declared, held = count * dtype.itemsize, len(raw) - stream.tell()
    if declared != held:
        raise InvalidInput(f"'{what}' is not a valid .npy array: its header declares shape "
                           f"{list(shape)} of {dtype} ({declared} bytes), the body holds "
                           f"{held} bytes of data")
    array = np.frombuffer(raw, dtype, count, stream.tell())
    return array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy (version 1.0) header for a C-ordered array: what np.save writes."""
    text = (f"{{'descr': '{dtype.str}', 'fortran_order': False, "
            f"'shape': {tuple(int(d) for d in shape)!r}, }}")
    pad = -(10 + len(text) + 1) % 64
    text = text + " " * pad + "\n"
    return _NPY_MAGIC + b"\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as an .npy file, with one copy of its data."""
    array = np.require(array, requirements="C")  # keeps a 0-d array 0-d
    return b"".join((npy_header(array.dtype, array.shape), array.reshape(-1).view(np.uint8)))


def wants(request: Request, *types: str) -> str:
    """The first of `types` the Accept header names, else JSON (406 if JSON is excluded)."""
    accept = request.headers.get("accept", "")
    for kind in types:
        if kind in accept:
            return kind
    if not accept or "*/*" in accept or "application/json" in accept or "*" in accept:
        return "application/json"
    raise ApiError(406, f"cannot answer with {accept!r}; choose application/json"
                        f"{''.join(', ' + t for t in types)}")


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()


def dumps_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """JSON of named arrays, serialized by orjson straight from numpy's buffers
    (float32 as the shortest text that reads back to the same float32)."""
    return orjson.dumps({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                        option=orjson.OPT_SERIALIZE_NUMPY)


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await run_in_threadpool(fn, *args, **kwargs)


Id = Annotated[int, Path(ge=1, le=2**63 - 1, description="a row id")]


REF_PATTERN = r"^([1-9][0-9]{0,18}|@[a-z][a-z0-9_.-]{0,62})$"
REF_HELP = "an id, or @name for an alias (PUT /v1/aliases/{name})"


async def _ref(request: Request, ref: str, kind: str) -> int:
    from store.aliases import resolve

    if ref.isdigit():
        if int(ref) > 2**63 - 1:
            raise ApiError(404, f"{'model' if kind == 'model' else 'embedding set'} {ref} "
                                "does not exist")
        return int(ref)
    return await in_thread(resolve, services(request).db, ref, kind)


async def _model_id(request: Request, model_id: Annotated[str, Path(
        pattern=REF_PATTERN, description=REF_HELP, examples=["1", "@prod"])]) -> int:
    return await _ref(request, model_id, "model")


async def _set_id(request: Request, set_id: Annotated[str, Path(
        pattern=REF_PATTERN, description=REF_HELP, examples=["1", "@prod"])]) -> int:
    return await _ref(request, set_id, "embedding_set")


ModelId = Annotated[int, Depends(_model_id)]  # a model by id or @alias, resolved
SetId = Annotated[int, Depends(_set_id)]  # an embedding set by id or @alias, resolved
