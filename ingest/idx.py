"""IDX files, the MNIST family's format (`*-images-idx3-ubyte[.gz]`, with its labels
`*-labels-idx1-ubyte[.gz]` found beside it by name), streamed a chunk at a time once the
header's sizes are checked (docs/internals/ingest.md)."""

from __future__ import annotations

import contextlib
import gzip
import posixpath
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from ingest.images import ImageSpec
from ingest.plan import (
    CHUNK_BYTES,
    MAX_CHUNK_ROWS,
    IngestOptions,
    Limits,
    Location,
    Plan,
    Report,
    Unit,
)
from store.datasets import Chunk
from store.errors import DatasetError, TooLarge

IMAGES_MAGIC, LABELS_MAGIC = 0x0803, 0x0801


def is_idx_name(path: str) -> bool:
    name = posixpath.basename(path).lower().removesuffix(".gz")
    return name.endswith(("-idx3-ubyte", ".idx3-ubyte", "-idx1-ubyte", ".idx1-ubyte"))


def labels_beside(path: str) -> list[str]:
    """Where the labels of an images file would be, by name."""
    folder, name = posixpath.split(path)
    base = name.removesuffix(".gz").replace("images-idx3", "labels-idx1").replace(
        "images.idx3", "labels.idx1")
    if base == name.removesuffix(".gz"):
        return []
    return [posixpath.join(folder, base + ext) for ext in ("", ".gz")]


@contextlib.contextmanager
def _open(fs: Any, path: str | None) -> Iterator[Any]:
    """The file's bytes (gunzipped as read for `.gz`); nothing for no path."""
    if path is None:
        yield None
        return
    with fs.open(path, "rb") as raw:
        if path.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                yield f
        else:
            yield raw


def _header(f: Any, magic: int, what: str) -> tuple[int, ...]:
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DatasetError(f"{what} is not an IDX file (bad magic number)")
    found = (head[2] << 8) | head[3]
    if found != magic:
        raise DatasetError(f"{what}: IDX magic 0x{found:04x}; expected 0x{magic:04x} "
                           f"(uint8, {magic & 0xff} dimension(s))")
    ndim = head[3]
    sizes = f.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise DatasetError(f"{what} is truncated in its header")
    return struct.unpack(f">{ndim}I", sizes)


def plan_idx(location: Location, options: IngestOptions, limits: Limits) -> Plan:
    fs, path = location.fs, location.path
    name = posixpath.basename(path)
    try:
        with _open(fs, path) as f:
            n, h, w = _header(f, IMAGES_MAGIC, name)
    except OSError as exc:  # a gzip that is not one
        raise DatasetError(f"{name} cannot be read ({type(exc).__name__})") from None
    if n == 0:
        raise DatasetError(f"{name} holds no items")
    if n > limits.max_dataset_items:
        raise TooLarge(f"{name} declares {n} items; the limit is {limits.max_dataset_items}")
    if h * w > limits.max_item_values or h < 1 or w < 1:
        raise TooLarge(f"{name} declares {h}x{w} items; the limit is {limits.max_item_values} "
                       "values (max_item_values)")
    if n * h * w > limits.max_inflated_bytes:
        raise TooLarge(f"{name} declares {n * h * w} bytes of pixels; the limit is "
                       f"{limits.max_inflated_bytes} (max_inflated_bytes)")
    size = int(fs.size(path))
    if not path.lower().endswith(".gz") and size != 16 + n * h * w:
        raise DatasetError(f"{name} declares {n} items of {h}x{w} ({16 + n * h * w} bytes) "
                           f"but holds {size} bytes")
    labels = next((p for p in labels_beside(path) if fs.exists(p)), None)
    extra: dict[str, Any] = {"n": n, "h": h, "w": w, "labels": labels}
    if labels is not None:
        with _open(fs, labels) as f:
            (m,) = _header(f, LABELS_MAGIC, posixpath.basename(labels))
        if m != n:
            raise DatasetError(f"{posixpath.basename(labels)} has {m} labels for {n} images")
    return Plan("idx", location, [Unit(0, location.display, size, extra)], size, n,
                pixels=True, image=ImageSpec("grey", None), item_shape=(1, h, w))


def _read_exact(f: Any, size: int, what: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise DatasetError(f"{what} is truncated: {len(data)} of {size} bytes")
    return data


def read_idx(plan: Plan, unit: Unit, options: IngestOptions, limits: Limits,
             report: Report) -> Iterator[Chunk]:
    fs, path = plan.location.fs, plan.location.path
    n, h, w, labels_path = (unit.extra[k] for k in ("n", "h", "w", "labels"))
    rows = max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (h * w)))
    name = posixpath.basename(path)
    try:
        with _open(fs, path) as f, _open(fs, labels_path) as lf:
            _header(f, IMAGES_MAGIC, name)
            if labels_path:
                _header(lf, LABELS_MAGIC, posixpath.basename(labels_path))
            for start in range(0, n, rows):
                m = min(rows, n - start)
                values = np.frombuffer(_read_exact(f, m * h * w, name), np.uint8)
                labels = None
                if labels_path:
                    digits = _read_exact(lf, m, posixpath.basename(labels_path))
                    labels = [str(d) for d in digits]
                report.read += m
                yield Chunk(values.reshape(m, 1, h, w), [str(i) for i in range(start, start + m)],
                            labels)
    except (OSError, EOFError) as exc:  # a damaged gzip stream
        raise DatasetError(f"{name} cannot be read ({type(exc).__name__}: "
                           f"{str(exc)[:100]})") from None
