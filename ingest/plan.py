"""The contract between a source and whoever ingests it (the API's synchronous path, the
ingest jobs on the workers): a source is planned into *units*, each read on its own into
`Chunk`s, and the chunks of all units, in order, make the dataset (docs/internals/ingest.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ingest.images import ImageSpec
from store.errors import DatasetError, TooLarge
from store.settings import Settings

CHUNK_BYTES = 16 << 20  # of item values in one chunk, about
MAX_CHUNK_ROWS = 65_536  # rows in one chunk at most (keys and labels become Python objects)


@dataclass(frozen=True)
class Limits:
    """The bounds a reader applies to what a file declares, before reading it, and to what
    it decodes, while reading (see the settings of the same names)."""

    max_dataset_items: int = 50_000_000
    max_item_values: int = 1 << 20
    max_inflated_bytes: int = 8 << 30
    max_compression_ratio: float = 200.0
    max_side_chunk_bytes: int = 32 << 20
    max_table_columns: int = 4096
    max_image_pixels: int = 64 << 20
    max_temp_bytes: int = 8 << 30  # a remote array file's local copy
    temp_dir: str | None = None  # where it is made (None: the system's temp folder)

    @classmethod
    def of(cls, settings: Settings | None) -> Limits:
        if settings is None:
            return cls()
        return cls(settings.max_dataset_items, settings.max_item_values,
                   settings.max_inflated_bytes, settings.max_compression_ratio,
                   settings.max_side_chunk_bytes, settings.max_table_columns,
                   settings.max_image_pixels, settings.max_upload_temp_bytes,
                   str(settings.cache_dir))


@dataclass
class IngestOptions:
    """How to read a source: npz member, table columns, side arrays of keys and labels
    (arrays); the image transform and the failure share (images)."""

    format: str | None = None  # None: told by the extension / contents (see plan_source)
    array: str | None = None
    key_column: str | None = None
    label_column: str | None = None
    feature_columns: list[str] | None = None
    metadata_columns: list[str] | None = None
    keys_path: str | None = None
    labels_path: str | None = None
    image: ImageSpec | None = None  # None: ImageSpec() (rgb, each image's own size)
    image_column: str | None = None  # parquet: the column of {bytes, path} or bytes
    max_failure_share: float = 0.05
    report_failures: int = 20  # failures named in the report (all are counted)

    def to_dict(self) -> dict[str, Any]:
        """What the dataset records of how it was read (no server paths)."""
        out: dict[str, Any] = {k: v for k, v in {
            "format": self.format, "array": self.array, "key_column": self.key_column,
            "label_column": self.label_column, "feature_columns": self.feature_columns,
            "metadata_columns": self.metadata_columns, "image_column": self.image_column,
        }.items() if v is not None}
        if self.image is not None:
            out["image"] = self.image.to_dict()
        return out


@dataclass(frozen=True)
class Location:
    """A source: `path` on `fs` (an fsspec filesystem; local paths use the local one).
    `display` is what users and logs see (never a server's folders)."""

    fs: Any
    path: str
    display: str
    roots: tuple[str, ...] = ()  # local: the real allowed roots (a folder's symlinks)

    @property
    def is_local(self) -> bool:
        protocol = getattr(self.fs, "protocol", "file")
        return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))


@dataclass(frozen=True)
class Unit:
    index: int  # position in the plan: units are read and registered in this order
    name: str  # a file, member range or shard, for progress and the report
    size_bytes: int  # what reading it costs, for progress (bytes read)
    extra: dict[str, Any] = field(default_factory=dict)  # the reader's own


@dataclass
class Plan:
    format: str  # npy npz parquet csv images zip tar webdataset image-parquet idx
    location: Location
    units: list[Unit]
    total_bytes: int
    n_items: int | None = None  # when the headers tell
    pixels: bool = False  # 8-bit images: stored as uint8, seen as x / 255
    image: ImageSpec | None = None  # the transform applied, when the items are images
    # (C, H, W) every image must have: from image_size, or the first readable image (set
    # by source_of; a job reading units apart sets it from its first staged chunk)
    item_shape: tuple[int, ...] | None = None


@dataclass
class Report:
    """Items counted as read and as failed; the first `keep` failures named. `skipped`:
    files that are not images by their name (a README, a .DS_Store), neither read nor
    failed."""

    keep: int = 20
    strict: bool = False
    read: int = 0
    failed: int = 0
    bytes: int = 0  # source bytes the reader has consumed (progress within a unit)
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped: int = 0

    def fail(self, key: str, reason: str) -> None:
        self.failed += 1
        if len(self.failures) < self.keep:
            self.failures.append({"key": key, "reason": reason})

    @property
    def share(self) -> float:
        total = self.read + self.failed
        return self.failed / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "failed": self.failed, "skipped": self.skipped,
                "failures": list(self.failures)}

    def merge(self, other: dict[str, Any]) -> None:
        """Add a unit's report (as `to_dict` wrote it: a resumed job's staged units)."""
        self.read += int(other["read"])
        self.failed += int(other["failed"])
        self.skipped += int(other.get("skipped", 0))
        room = self.keep - len(self.failures)
        self.failures.extend(other["failures"][:max(0, room)])


def ingest_record(plan: Plan, options: IngestOptions, report: Report) -> dict[str, Any]:
    """What a dataset records of how it was read (`datasets.ingest`)."""
    record: dict[str, Any] = {"format": plan.format, "options": options.to_dict(),
                              "report": report.to_dict()}
    if plan.image is not None:
        record["image"] = plan.image.to_dict()
    return record


def rows_per_chunk(item_shape: Sequence[int], itemsize: int, side_bytes: int = 0,
                   max_side_bytes: int = 32 << 20) -> int:
    """Rows per read step: about CHUNK_BYTES of values, at most MAX_CHUNK_ROWS rows (each
    row's key and label become Python objects), and at most `max_side_bytes` of side
    entries of `side_bytes` each."""
    rows = min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(1, itemsize * math.prod(item_shape)))
    if side_bytes:
        rows = min(rows, max_side_bytes // side_bytes)
    return max(1, rows)


def check_declared(n: int, item_shape: Sequence[int], itemsize: int, limits: Limits,
                   what: str) -> None:
    """What a header or metadata declares, against the limits: before anything is read."""
    if n < 0 or any(d < 0 for d in item_shape):
        raise DatasetError(f"{what} declares a negative dimension")
    if n > limits.max_dataset_items:
        raise TooLarge(f"{what} declares {n} items; the limit is {limits.max_dataset_items} "
                       "(max_dataset_items)")
    size = math.prod(item_shape)
    if size > limits.max_item_values:
        raise TooLarge(f"items have {size} values each; the limit is "
                       f"{limits.max_item_values} (max_item_values)")
    inflated = n * size * max(itemsize, 4)  # the file's values, or their float32 copy
    if inflated > limits.max_inflated_bytes:
        raise TooLarge(f"{what} declares {n} x {size} values ({inflated} bytes decoded); the "
                       f"limit is {limits.max_inflated_bytes} bytes (max_inflated_bytes)")
