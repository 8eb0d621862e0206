"""Request and response bodies: JSON parsed into models, `.npy` arrays read without a copy
and written with one, and the media types a request sends and accepts."""

from __future__ import annotations

import functools
import io
import json
import math
import re
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from service.api.errors import ApiError, describe_validation
from store.errors import InvalidInput

NPY = "application/x-npy"
Body = TypeVar("Body", bound=BaseModel)


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
    return _npy_header(dtype.str, tuple(map(int, shape)))


@functools.lru_cache(maxsize=256)  # a served model answers the same few shapes
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    if shape:  # numpy leaves room for the first axis to grow to 21 digits in place
        text += " " * (21 - len(repr(shape[0])))
    text += " " * (64 - (11 + len(text)) % 64) + "\n"  # 1 to 64 spaces, as numpy pads
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
