"""Encoded images to chunks: what every image reader (folders, archives, WebDataset shards,
parquet image columns) shares once it has an image's bytes. An item that cannot be used or
stored is one item's failure in the report, never the dataset's error
(docs/internals/ingest.md)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ingest.images import ImageError, ImageSpec, decode_image
from ingest.plan import CHUNK_BYTES, MAX_CHUNK_ROWS, Plan, Report
from store.datasets import Chunk

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 64 << 20  # one encoded image; a larger file is a failure, not read
MAX_SIDE_BYTES = 1 << 20  # one WebDataset cls/txt/json member
MAX_KEY_CHARS = 1000
MAX_KEY_BYTES = 2000  # UTF-8; PostgreSQL's unique index on keys takes about 2700 a row
MAX_LABEL_CHARS = 1000
MAX_METADATA_BYTES = 64 << 10  # an item's metadata as JSON
SHOWN_KEY_CHARS = 200  # of a failed item's key in the report


@dataclass
class Encoded:
    """One item before decoding: its key, label, metadata and encoded bytes."""

    key: str
    data: bytes
    label: str | None = None
    metadata: dict[str, Any] | None = None


def spec_of(plan: Plan, max_pixels: int) -> ImageSpec:
    spec = plan.image or ImageSpec()
    if spec.max_pixels != max_pixels:
        spec = ImageSpec(spec.color, spec.size, max_pixels)
    return spec


def _shape_text(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[2]}"


def shown_key(key: str) -> str:
    """A key as the report can hold it: NUL written `\\x00`, at most SHOWN_KEY_CHARS
    (the report is stored as JSON in PostgreSQL, which takes neither a NUL nor, usefully,
    a megabyte of key)."""
    key = key.replace("\x00", "\\x00")
    return key if len(key) <= SHOWN_KEY_CHARS else key[:SHOWN_KEY_CHARS - 1] + "…"


def _has_nul(value: Any) -> bool:
    """A NUL in any string of a JSON value (keys too); iterative, so depth costs no
    recursion."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list | tuple):
            stack.extend(v)
    return False


def text_problem(what: str, text: str, limit: int) -> str | None:
    """Why `text` cannot be a key or label (`what`), or None."""
    if "\x00" in text:
        return f"its {what} contains a NUL character"
    if len(text) > limit:
        return f"its {what} is {len(text)} characters; the limit is {limit}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name's undecodable bytes (surrogates)
        return f"its {what} is not valid UTF-8 text"
    return None


def item_problem(key: str, label: str | None, metadata: dict[str, Any] | None) -> str | None:
    """Why this item's key, label or metadata cannot be stored, or None."""
    problem = text_problem("key", key, MAX_KEY_CHARS)
    if problem is None and len(key.encode("utf-8")) > MAX_KEY_BYTES:
        problem = f"its key is more than {MAX_KEY_BYTES} bytes as UTF-8"
    if problem is None and label is not None:
        problem = text_problem("label", label, MAX_LABEL_CHARS)
    if problem is not None or metadata is None:
        return problem
    try:
        text = json.dumps(metadata, allow_nan=False)
    except ValueError:
        return "its metadata holds NaN or infinity (not JSON)"
    except RecursionError:
        return "its metadata is nested too deeply"
    except TypeError as exc:
        return f"its metadata is not JSON ({str(exc)[:80]})"
    if len(text) > MAX_METADATA_BYTES:
        return (f"its metadata is {len(text)} bytes as JSON; the limit is "
                f"{MAX_METADATA_BYTES}")
    if _has_nul(metadata):
        return "its metadata contains a NUL character"
    return None


def image_chunks(items: Iterable[Encoded], plan: Plan, report: Report,
                 max_pixels: int) -> Iterator[Chunk]:
    """Decode `items` in order into chunks; failures go to `report`."""
    spec = spec_of(plan, max_pixels)
    values: list[np.ndarray] = []
    keys: list[str] = []
    labels: list[str | None] = []
    metadata: list[dict[str, Any] | None] = []
    size = 0

    def flush() -> Chunk:
        chunk = Chunk(np.stack(values), list(keys),
                      list(labels) if any(v is not None for v in labels) else None,
                      list(metadata) if any(m is not None for m in metadata) else None)
        values.clear(), keys.clear(), labels.clear(), metadata.clear()
        return chunk

    for item in items:
        report.bytes += len(item.data)  # the job's progress inside a unit
        problem = item_problem(item.key, item.label, item.metadata)
        if problem is not None:
            report.fail(shown_key(item.key), problem)
            continue
        try:
            pixels = decode_image(item.data, spec)
        except ImageError as exc:
            report.fail(item.key, str(exc))
            continue
        if plan.item_shape is None:
            plan.item_shape = tuple(pixels.shape)
        elif tuple(pixels.shape) != plan.item_shape:
            report.fail(item.key, f"the image is {_shape_text(pixels.shape)} pixels; the first "
                        f"one was {_shape_text(plan.item_shape)}: give image_size to resize "
                        "them all to one size")
            continue
        values.append(pixels)
        keys.append(item.key)
        labels.append(item.label)
        metadata.append(item.metadata)
        report.read += 1
        size += pixels.nbytes
        if size >= CHUNK_BYTES or len(values) >= MAX_CHUNK_ROWS:
            yield flush()
            size = 0
    if values:
        yield flush()


def read_bounded(f: Any, declared: int | None, what: str,
                 limit: int = MAX_IMAGE_BYTES) -> bytes | str:
    """At most `limit` bytes of `f`: the bytes, or the reason they were not read (a
    failure for the report). Reads what the file declares (plus one byte, to see it grew),
    never a buffer of `limit` bytes for a small file."""
    if declared is not None and declared > limit:
        return f"{what} is {declared} bytes; the limit for one image is {limit}"
    if declared is not None:
        data = f.read(declared + 1)
    else:
        parts, size = [], 0
        while size <= limit:
            part = f.read(1 << 20)
            if not part:
                break
            parts.append(part)
            size += len(part)
        data = b"".join(parts)
    if len(data) > limit:
        return f"{what} is more than {limit} bytes (the limit for one image)"
    return data


def label_of(key: str) -> str | None:
    """An image folder's label: the first folder under the root (none at the root)."""
    return key.split("/", 1)[0] if "/" in key else None


def is_hidden(name: str) -> bool:
    """Files that no one means as items: dot files (macOS's `._x.png`), `__MACOSX/`."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))
