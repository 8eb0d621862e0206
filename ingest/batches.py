"""Encoded images to chunks: what every image reader (folders, archives, WebDataset shards,
parquet image columns) shares once it has an image's bytes.

Each image is decoded with `ingest.images.decode_image` and the plan's `ImageSpec`; one
that cannot be used is recorded in the report (key and reason) and left out, never
raised. Without `image_size` every image must have the shape of the first readable one
(`plan.item_shape`): another size is a failure that names both and suggests image_size.
Chunks hold uint8 `(m, C, H, W)`, at most CHUNK_BYTES of pixels or MAX_CHUNK_ROWS rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ingest.images import ImageError, ImageSpec, decode_image
from ingest.plan import Plan, Report
from store.datasets import Chunk

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
MAX_CHUNK_ROWS = 65_536
MAX_IMAGE_BYTES = 64 << 20  # one encoded image; a larger file is a failure, not read
MAX_SIDE_BYTES = 1 << 20  # one WebDataset cls/txt/json member


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
