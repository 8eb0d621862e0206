"""The dataset registry: one pass over a source, in chunks, into a canonical `.npy` (float32,
or uint8 for 8-bit images) plus `items` rows, in one transaction: all of it or nothing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.exc import IntegrityError

from store.artifacts import ArtifactStore, dataset_key
from store.db import Database, analyze, get_row, unbounded
from store.deletion import blockers, refuse_if_blocked
from store.errors import Conflict, DatasetError, NotFound, TooLarge
from store.indexes import live_index_builds
from store.leftovers import LEFTOVER_PREFIX
from store.partitions import drop_partitions
from store.settings import Settings
from store.tables import Dataset, EmbeddingSet, EmbeddingSetPart, Item, Model

log = logging.getLogger(__name__)

HEADER_BYTES = 256  # fixed-size .npy header, rewritten in place once the row count is known


@dataclass
class Chunk:
    values: np.ndarray  # (m, *item_shape), source dtype
    keys: list[str] | None = None
    labels: list[str | None] | None = None
    metadata: list[dict[str, Any] | None] | None = None


@dataclass
class Source:
    """A dataset file opened for streaming."""

    format: str
    item_shape: tuple[int, ...]
    dtype: str
    n_items: int | None  # None when only a full pass tells (CSV)
    chunks: Iterator[Chunk]
    has_keys: bool = False
    has_labels: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    # 8-bit images: the chunks hold uint8 0..255, stored as uint8 (`datasets.dtype`) and
    # seen as x / 255 in [0, 1] (min_value and max_value are recorded on that scale)
    pixels: bool = False


class _SameContent(Exception):
    def __init__(self, dataset_id: int) -> None:
        self.dataset_id = dataset_id


@dataclass
class Registered:
    dataset: Dataset
    created: bool  # False when the same content was already registered


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A version-1.0 `.npy` header for C-order data (float32, or `|u1`), padded to
    HEADER_BYTES."""
    body = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    prefix = b"\x93NUMPY\x01\x00"
    pad = HEADER_BYTES - len(prefix) - 2 - len(body) - 1
    if pad < 0:
        raise DatasetError(f"item shape {list(shape[1:])} has too many dimensions")
    header = body + b" " * pad + b"\n"
    return prefix + len(header).to_bytes(2, "little") + header


class _CanonicalWriter:
    """Appends validated chunks as float32 (or uint8 for `pixels`) to a `.npy` file and
    hashes the content.

    Its size is counted before each write: it stays within `max_inflated_bytes`, and with
    the `temp_bytes` its caller already wrote (an upload's saved parts) within
    `max_upload_temp_bytes`, whatever a file's headers declared."""

    def __init__(self, path: str, settings: Settings, temp_bytes: int = 0,
                 pixels: bool = False) -> None:
        self.path, self.settings, self.temp_bytes = path, settings, temp_bytes
        self.pixels = pixels
        self.itemsize = 1 if pixels else 4
        self.file = open(path, "wb")  # noqa: SIM115 - closed in finish/abort
        self.file.write(b"\0" * HEADER_BYTES)
        self.values_hash, self.meta_hash = hashlib.sha256(), hashlib.sha256()
        self.item_shape: tuple[int, ...] | None = None
        self.n = 0
        self.lo, self.hi = np.inf, -np.inf
        self.saw_labels = False

    def append(self, chunk: Chunk) -> np.ndarray:
        values = chunk.values
        if self.item_shape is None:
            self.item_shape = tuple(values.shape[1:])
            size = int(np.prod(self.item_shape))
            if size == 0:
                raise DatasetError("items have no values (an item dimension is 0)")
            if size > self.settings.max_item_values:
                raise TooLarge(f"items have {size} values each; the limit is "
                               f"{self.settings.max_item_values}")
        elif tuple(values.shape[1:]) != self.item_shape:
            raise DatasetError(f"inconsistent item shape: item {self.n} is "
                               f"{list(values.shape[1:])}, earlier items {list(self.item_shape)}")
        if self.n + len(values) > self.settings.max_dataset_items:
            raise TooLarge(f"more than {self.settings.max_dataset_items} items")
        size = (HEADER_BYTES
                + self.itemsize * (self.n + len(values)) * int(np.prod(self.item_shape)))
        if size > self.settings.max_inflated_bytes:
            raise TooLarge(f"the items decode to more than {self.settings.max_inflated_bytes} "
                           f"bytes as {'uint8' if self.pixels else 'float32'} "
                           "(max_inflated_bytes)")
        if self.temp_bytes + size > self.settings.max_upload_temp_bytes:
            raise TooLarge(f"registering this dataset needs more than "
                           f"{self.settings.max_upload_temp_bytes} bytes of temporary files "
                           "(max_upload_temp_bytes)")
        if self.pixels:
            return self._append_pixels(values)
        with np.errstate(over="ignore"):  # overflow is reported below, by item
            as32 = np.ascontiguousarray(values, dtype="<f4")
        flat = as32.reshape(len(as32), -1)
        lo, hi = float(flat.min()), float(flat.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = int(np.argmin(np.isfinite(flat).all(axis=1)))
            what = "overflows float32" if np.isfinite(values[bad]).all() else "is not finite"
            raise DatasetError(f"item {self.n + bad} has a value that {what} (NaN or infinity)")
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        buf = memoryview(as32).cast("B")  # no copy
        self.file.write(buf)
        self.values_hash.update(buf)
        self.n += len(values)
        return as32

    def _append_pixels(self, values: np.ndarray) -> np.ndarray:
        """8-bit images as they are: no conversion, no finiteness to check."""
        if values.dtype != np.uint8:
            raise DatasetError(f"image items must be uint8 (0..255); a reader gave "
                               f"{values.dtype}")
        data = np.ascontiguousarray(values)
        self.lo = min(self.lo, int(data.min()) / 255.0)
        self.hi = max(self.hi, int(data.max()) / 255.0)
        buf = memoryview(data.reshape(-1)).cast("B")
        self.file.write(buf)
        self.values_hash.update(buf)
        self.n += len(values)
        return data

    def finish(self) -> str:
        """Write the real header; returns the content checksum."""
        if self.n == 0 or self.item_shape is None:
            raise DatasetError("the dataset is empty: no items")
        self.file.seek(0)
        self.file.write(npy_header((self.n, *self.item_shape), "|u1" if self.pixels else "<f4"))
        self.file.close()
        total = hashlib.sha256()
        # float32 datasets keep the checksum they always had; uint8 ones say so
        described = [self.n, list(self.item_shape)] + (["uint8"] if self.pixels else [])
        total.update(json.dumps(described).encode())
        total.update(self.values_hash.digest())
        total.update(self.meta_hash.digest())
        return total.hexdigest()

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def _copy_items(cursor: Any, dataset_id: int, start: int, chunk: Chunk,
                writer: _CanonicalWriter) -> None:
    m = len(chunk.values)
    keys = chunk.keys or [str(i) for i in range(start, start + m)]
    labels = chunk.labels or [None] * m
    metadata = chunk.metadata or [None] * m
    with cursor.copy('COPY items (dataset_id, "index", key, label, metadata) FROM STDIN') as copy:
        for i in range(m):
            meta = json.dumps(metadata[i], sort_keys=True) if metadata[i] is not None else None
            copy.write_row((dataset_id, start + i, keys[i], labels[i], meta))
            if writer.pixels:  # by row: images are the same content however chunked
                # JSON, so that no label (null) and the label "None" hash apart
                writer.meta_hash.update(json.dumps([keys[i], labels[i], meta]).encode())
    writer.saw_labels = writer.saw_labels or any(label is not None for label in labels)
    if not writer.pixels and (chunk.keys or chunk.labels or chunk.metadata):
        writer.meta_hash.update(json.dumps([chunk.keys, chunk.labels, chunk.metadata],
                                           sort_keys=True).encode())


def _duplicate_key(exc: BaseException) -> str:
    detail = getattr(getattr(exc, "diag", None), "message_detail", None) or ""
    # "Key (dataset_id, key)=(7, abc) already exists."
    if ")=(" in detail:
        value = detail.split(")=(", 1)[1].rsplit(") already exists", 1)[0]
        return value.split(", ", 1)[1] if ", " in value else value
    return "?"


def _check_source(name: str, source: Source, settings: Settings) -> None:
    if not name or len(name) > 200 or name != name.strip():
        raise DatasetError("name must be 1-200 characters without surrounding spaces")
    if source.n_items == 0:
        raise DatasetError("the dataset is empty: no items")
    if source.n_items is not None and source.n_items > settings.max_dataset_items:
        raise TooLarge(f"{source.n_items} items; the limit is {settings.max_dataset_items}")


def _insert_pending(conn: Connection, source: Source, source_uri: str | None,
                    ingest: dict[str, Any] | None) -> int:
    """The dataset's row under a placeholder name and checksum; returns its id. The name is
    taken at the end: the same content sent again (a client's retry after a lost answer)
    finds its dataset whatever name it carries."""
    return conn.execute(
        Dataset.__table__.insert().values(
            name=f"pending-{uuid.uuid4()}", item_shape=[],
            dtype="uint8" if source.pixels else "float32",
            source_dtype=source.dtype, source_format=source.format, n_items=0,
            checksum=f"pending-{uuid.uuid4()}",
            source_uri=source_uri, artifact_key="", size_bytes=0, min_value=0.0,
            max_value=0.0, has_labels=source.has_labels, ingest=ingest,
        ).returning(Dataset.id)).scalar_one()


def _copy_chunks(conn: Connection, dataset_id: int, source: Source,
                 writer: _CanonicalWriter) -> str:
    """Every chunk into the canonical file and its items into `items`; returns the
    checksum, or raises _SameContent when that content is registered already."""
    cursor = conn.connection.driver_connection.cursor()
    for chunk in source.chunks:
        start = writer.n
        writer.append(chunk)
        try:
            _copy_items(cursor, dataset_id, start, chunk, writer)
        except psycopg.errors.UniqueViolation as exc:
            raise DatasetError(f"duplicate key {_duplicate_key(exc)!r}: keys must be "
                               "unique within a dataset") from None
    checksum = writer.finish()
    existing = conn.execute(select(Dataset.id).where(Dataset.checksum == checksum)).scalar()
    if existing is not None:
        raise _SameContent(existing)
    return checksum


def register_dataset(db: Database, artifacts: ArtifactStore, settings: Settings, name: str,
                     source: Source, source_uri: str | None = None,
                     temp_bytes: int = 0,
                     ingest: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
                     ) -> Registered:
    """Ingest an opened `source` (a reader's: see `ingest/`) as `name`, in one
    transaction with its canonical file: all of it or nothing. `temp_bytes`: the
    temporary files already written for it (counted against `max_upload_temp_bytes`).
    `ingest`: how it was read (`datasets.ingest`: image transform, report, options), or a
    function giving it once every chunk is read (a report is complete only then)."""
    _check_source(name, source, settings)
    tmp_dir = artifacts.local_path("tmp") if artifacts.is_local else None
    if tmp_dir:
        os.makedirs(tmp_dir, exist_ok=True)
    fd, canonical = tempfile.mkstemp(prefix=f"{LEFTOVER_PREFIX}{os.getpid()}-", suffix=".npy",
                                     dir=tmp_dir)
    os.close(fd)
    writer = _CanonicalWriter(canonical, settings, temp_bytes, source.pixels)
    artifact_key: str | None = None
    try:
        with db.engine.begin() as conn:
            dataset_id = _insert_pending(conn, source, source_uri,
                                         None if callable(ingest) else ingest)
            checksum = _copy_chunks(conn, dataset_id, source, writer)
            if conn.execute(select(Dataset.id).where(Dataset.name == name)).first():
                raise Conflict(f"a dataset named {name!r} already exists (with other content)")
            artifact_key = dataset_key(dataset_id)
            size = os.path.getsize(canonical)
            artifacts.put_local_file(canonical, artifact_key)
            conn.execute(update(Dataset).where(Dataset.id == dataset_id).values(
                name=name, item_shape=list(writer.item_shape or ()), n_items=writer.n,
                checksum=checksum, artifact_key=artifact_key, size_bytes=size, min_value=writer.lo,
                max_value=writer.hi, has_labels=source.has_labels or writer.saw_labels,
                **({"ingest": ingest()} if callable(ingest) else {})))
    except _SameContent as same:
        writer.abort()
        log.info("dataset content already registered dataset_id=%d", same.dataset_id)
        return Registered(get_dataset(db, same.dataset_id), created=False)
    except IntegrityError as exc:
        writer.abort()
        if artifact_key:
            artifacts.delete(artifact_key)
        raise Conflict(f"dataset {name!r} conflicts with a stored one: "
                       f"{str(exc.orig).splitlines()[0]}") from None
    except BaseException:
        writer.abort()
        if artifact_key:
            artifacts.delete(artifact_key)
        raise
    if writer.n >= 10_000:
        analyze(db, "items")
    dataset = get_dataset(db, dataset_id)
    log.info("dataset registered dataset_id=%d items=%d shape=%s", dataset.id, dataset.n_items,
             dataset.item_shape)
    return Registered(dataset, created=True)


def get_dataset(db: Database, dataset_id: int) -> Dataset:
    return get_row(db, Dataset, dataset_id, "dataset")


def list_datasets(db: Database, limit: int = 100, offset: int = 0) -> list[Dataset]:
    with db.session() as s:
        return list(s.scalars(select(Dataset).order_by(Dataset.id).limit(limit).offset(offset)))


def delete_dataset(db: Database, artifacts: ArtifactStore, dataset_id: int) -> None:
    """Delete a dataset, its items and embedding sets; refused while models use it.

    The dataset row is locked first (FOR UPDATE), and every submission that references
    the dataset holds a share lock on it until it commits (`store.submit`): a submission
    that went first is seen by the checks below (409), one that comes later waits and
    then finds no dataset (404). Nothing is deleted under a job that uses it."""
    with db.session() as s:
        dataset = s.get(Dataset, dataset_id, with_for_update=True)
        if dataset is None:
            raise NotFound(f"dataset {dataset_id} does not exist")
        n_models = s.scalar(select(func.count()).where(Model.dataset_id == dataset_id))
        if n_models:
            raise Conflict(f"dataset {dataset_id} is used by {n_models} model(s); "
                           "delete them first")
        # other models' embedding sets of this dataset go with it (unless aliased or busy);
        # a set it was appended to keeps it: that set must go first
        appended = list(s.scalars(select(EmbeddingSetPart.set_id).where(
            EmbeddingSetPart.dataset_id == dataset_id, EmbeddingSetPart.start > 0)
            .order_by(EmbeddingSetPart.set_id)))
        if appended:
            raise Conflict(f"dataset {dataset_id} was appended to embedding set "
                           f"{', '.join(map(str, appended[:5]))}; delete the set first")
        set_ids = list(s.scalars(select(EmbeddingSet.id).where(
            EmbeddingSet.dataset_id == dataset_id).with_for_update()))
        refuse_if_blocked(f"dataset {dataset_id}", *blockers(s, set_ids=set_ids))
        building = live_index_builds(s, set_ids)
        if building:
            raise Conflict(f"dataset {dataset_id}'s embedding set {building[0]} is building "
                           "its index; delete the dataset once it is built")
        unbounded(s)  # the cascade is as large as the data
        s.execute(delete(Dataset).where(Dataset.id == dataset_id))
    drop_partitions(db, set_ids)  # the sets' rows and indexes
    artifacts.delete(dataset_key(dataset_id, None))


def dataset_array(artifacts: ArtifactStore, dataset: Dataset, cache_dir: str) -> np.ndarray:
    """The canonical data as a read-only memory map (downloaded once for remote stores),
    in its stored dtype: uint8 image sets are 0..255 (see `models.transforms.item_values`)."""
    local = artifacts.local_path(dataset.artifact_key)
    if local is None:
        os.makedirs(cache_dir, exist_ok=True)
        local = os.path.join(cache_dir, f"dataset-{dataset.id}-{dataset.checksum[:16]}.npy")
        if not os.path.exists(local):
            artifacts.get_file(dataset.artifact_key, local)  # whole or not at all
    return np.load(local, mmap_mode="r", allow_pickle=False)


def item_rows(db: Database, dataset_id: int, start: int, stop: int) -> list[Item]:
    with db.session() as s:
        return list(s.scalars(select(Item).where(Item.dataset_id == dataset_id,
                                                 Item.index >= start, Item.index < stop)
                              .order_by(Item.index)))
