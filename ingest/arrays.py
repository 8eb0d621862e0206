"""Streamed readers of array files (`.npy`, `.npz`, `.parquet`, `.csv`): they turn a file
into the `Source` that `store.datasets` ingests.

Each reader yields `Chunk`s of at most about `CHUNK_BYTES` of item values, so a file of
any size is read in bounded memory. Nothing is unpickled: `.npy` and `.npz` members are
parsed from their headers with `allow_pickle=False` semantics, object arrays refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ingest.plan import IngestOptions, Limits, check_declared, rows_per_chunk
from store.artifacts import ArtifactStore
from store.datasets import Chunk, Registered, Source, register_dataset
from store.db import Database
from store.errors import DatasetError, TooLarge, UnsupportedFormat
from store.settings import Settings

MAX_NPZ_MEMBERS = 256
FORMATS = (".npy", ".npz", ".parquet", ".csv")


def check_numeric(dtype: np.dtype, what: str) -> None:
    if dtype.hasobject:
        raise DatasetError(f"{what} holds Python objects (a pickled array); only numeric "
                           "arrays are accepted")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
            or dtype == np.bool_):
        raise DatasetError(f"{what} must be numeric (integers, floats or booleans); "
                           f"got dtype {dtype}")





def format_of(filename: str) -> str:
    ext = os.path.splitext(filename)[1].lower()
    if ext not in FORMATS:
        raise UnsupportedFormat(f"unsupported file type {ext or '(none)'!r}; "
                                f"use one of {', '.join(FORMATS)}")
    return ext[1:]


def label_strings(values: np.ndarray) -> list[str | None]:
    """Labels as text: integers as digits, integral floats without '.0', NaN as missing."""
    if values.dtype.kind in "US":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]
    check_numeric(values.dtype, "labels")
    if values.dtype.kind == "f":
        return [None if math.isnan(v) else (str(int(v)) if float(v).is_integer() else repr(v))
                for v in values.tolist()]
    return [str(v) for v in values.tolist()]


def key_strings(values: np.ndarray) -> list[str]:
    if values.dtype.kind in "US":
        keys = [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]
    elif values.dtype.kind in "iu":
        keys = [str(v) for v in values.tolist()]
    else:
        raise DatasetError(f"keys must be strings or integers; got dtype {values.dtype}")
    if any(k == "" for k in keys):
        raise DatasetError("keys must not be empty strings")
    return keys


# -- npy / npz ---------------------------------------------------------------------------
#
# Nothing is read whole: a header is parsed first (numpy's own parser, never unpickling),
# the sizes it declares are checked against the limits and against the file's (or the zip
# member's declared) size, and then the data, keys and labels are read in step, one chunk
# of rows at a time, each read counted. A zip member inflates only as far as it is read, so
# a bomb costs no more than its declared (and checked) size.

READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError)


@dataclass
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # bytes before the data

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_npy_header(f: Any, what: str) -> _Header:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    except (ValueError, TypeError, OverflowError, SyntaxError) as exc:
        raise DatasetError(f"{what} is not a valid .npy array: {exc}") from None
    except READ_ERRORS as exc:
        raise DatasetError(f"{what} cannot be read: {exc}") from None
    shape, dtype = tuple(shape), np.dtype(dtype)
    if dtype.hasobject:
        raise DatasetError(f"{what} holds Python objects (a pickled array); only numeric "
                           "arrays are accepted")
    if any(d < 0 for d in shape):
        raise DatasetError(f"{what} declares a negative dimension {list(shape)}")
    return _Header(shape, dtype, bool(fortran), offset)


def _check_length(header: _Header, stored: int, what: str) -> None:
    """A data length that does not match its header is refused before it is read."""
    if stored - header.offset != header.data_bytes:
        raise DatasetError(f"{what}: its header declares shape {list(header.shape)} of "
                           f"{header.dtype} ({header.data_bytes} bytes) but it holds "
                           f"{stored - header.offset} bytes of data")


def _read_exactly(f: Any, size: int, what: str) -> bytes:
    try:
        buf = f.read(size)
    except READ_ERRORS as exc:
        raise DatasetError(f"{what} is corrupt: {exc}") from None
    if len(buf) != size:
        raise DatasetError(f"{what} is truncated: its data is shorter than its header "
                           "declares")
    return buf


@dataclass
class _Member:
    """One array of a file, opened for reading in chunks of rows."""

    name: str  # for messages
    header: _Header
    open: Any  # () -> a binary file object positioned after the header

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.header.shape[1:]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.header.dtype.itemsize


def _side_member(member: _Member | None, n: int, limits: Limits) -> _Member | None:
    if member is None:
        return None
    shape, dtype, what = member.header.shape, member.header.dtype, member.name
    if len(shape) != 1:
        raise DatasetError(f"{what} must be one-dimensional; got shape {list(shape)}")
    if shape[0] != n:
        raise DatasetError(f"{what} has {shape[0]} entries but the data has {n} items")
    if dtype.kind not in "US":
        check_numeric(dtype, what)
    if dtype.itemsize > limits.max_side_chunk_bytes:
        raise TooLarge(f"{what} entries are {dtype.itemsize} bytes each; the limit is "
                       f"{limits.max_side_chunk_bytes} (max_side_chunk_bytes)")
    return member


def _source(fmt: str, data: _Member, keys: _Member | None, labels: _Member | None,
            limits: Limits) -> Source:
    header = data.header
    check_numeric(header.dtype, data.name)
    if len(header.shape) == 0:
        raise DatasetError(f"{data.name} is a scalar; expected an array with one row per item")
    if header.fortran and len(header.shape) > 1:
        raise DatasetError(f"{data.name} is Fortran-ordered; save it with np.ascontiguousarray")
    if len(header.shape) == 1:
        header.shape = (header.shape[0], 1)
    n = header.shape[0]
    check_declared(n, header.shape[1:], header.dtype.itemsize, limits, data.name)
    keys = _side_member(keys, n, limits)
    labels = _side_member(labels, n, limits)
    sides = [m for m in (keys, labels) if m is not None]
    step = rows_per_chunk(data.row_shape, header.dtype.itemsize,
                          sum(m.header.dtype.itemsize for m in sides),
                          limits.max_side_chunk_bytes)

    def chunks() -> Iterator[Chunk]:
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(m.open()) for m in (data, keys, labels)
                     if m is not None]
            for start in range(0, n, step):
                m = min(step, n - start)
                arrays = [np.frombuffer(_read_exactly(f, m * member.row_bytes, member.name),
                                        dtype=member.header.dtype).reshape(m, *member.row_shape)
                          for f, member in zip(files, [data, *sides], strict=True)]
                side = dict(zip([id(s) for s in sides], arrays[1:], strict=True))
                yield Chunk(arrays[0],
                            key_strings(side[id(keys)]) if keys is not None else None,
                            label_strings(side[id(labels)]) if labels is not None else None)

    return Source(fmt, header.shape[1:], str(header.dtype), n, chunks(), keys is not None,
                  labels is not None)


def _npy_member(path: str, what: str) -> _Member:
    with open(path, "rb") as f:
        header = _read_npy_header(f, what)
    _check_length(header, os.path.getsize(path), what)

    @contextlib.contextmanager
    def opened() -> Iterator[Any]:
        with open(path, "rb") as f:
            f.seek(header.offset)
            yield f

    return _Member(what, header, opened)


def open_npy(path: str, keys_path: str | None = None, labels_path: str | None = None,
             limits: Limits | None = None) -> Source:
    """A `.npy` data file, with optional `.npy` files of keys and labels (one per item)."""
    limits = limits or Limits()
    return _source("npy", _npy_member(path, "the .npy array"),
                   _npy_member(keys_path, "keys") if keys_path else None,
                   _npy_member(labels_path, "labels") if labels_path else None, limits)


def _zip_entries(path: str) -> int:
    """The entry count the end-of-archive record declares, read before the directory is."""
    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # type: ignore[attr-defined]
    except OSError as exc:
        raise DatasetError(f"the .npz file cannot be read: {exc}") from None
    if not end:
        raise DatasetError("the .npz file is not a valid zip archive: no end record")
    return int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]


def _npz_member(path: str, info: zipfile.ZipInfo | None, what: str,
                limits: Limits) -> _Member | None:
    """One `.npy` member of an `.npz`: its header read and checked against the member's
    size, stored or deflated only, its inflation ratio within the limit."""
    if info is None:
        return None
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DatasetError(f"{what} is compressed with zip method {info.compress_type}; "
                           "only stored or deflated members are read (np.savez, "
                           "np.savez_compressed)")

    @contextlib.contextmanager
    def opened() -> Iterator[Any]:
        try:
            with zipfile.ZipFile(path) as z, z.open(info) as f:
                _read_npy_header(f, what)
                yield f
        except READ_ERRORS as exc:
            raise DatasetError(f"{what} is corrupt: {exc}") from None

    try:
        with zipfile.ZipFile(path) as z, z.open(info) as f:
            header = _read_npy_header(f, what)
    except READ_ERRORS as exc:
        raise DatasetError(f"{what} is corrupt: {exc}") from None
    _check_length(header, info.file_size, what)
    if (info.file_size > 1 << 20 and info.file_size
            > limits.max_compression_ratio * max(1, info.compress_size)):
        raise TooLarge(f"{what} inflates {info.file_size // max(1, info.compress_size)}-"
                       f"fold ({info.compress_size} -> {info.file_size} bytes); the limit "
                       f"is {limits.max_compression_ratio:g} (max_compression_ratio)")
    return _Member(what, header, opened)


def open_npz(path: str, array: str | None = None, limits: Limits | None = None) -> Source:
    limits = limits or Limits()
    if _zip_entries(path) > MAX_NPZ_MEMBERS:
        raise DatasetError(f"the .npz file has more than {MAX_NPZ_MEMBERS} members")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DatasetError(f"the .npz file is not a valid zip archive: {exc}") from None
    with archive:
        infos = {i.filename[:-4]: i for i in archive.infolist() if i.filename.endswith(".npy")}
    names = sorted(infos)
    if array is None:
        candidates = [n for n in names if n not in ("keys", "labels")]
        if len(candidates) != 1:
            raise DatasetError("the .npz file must hold exactly one data array besides "
                               f"'keys' and 'labels' (or name it); found {names}")
        array = candidates[0]
    if array not in infos:
        raise DatasetError(f"the .npz file has no array {array!r}; found {names}")
    data = _npz_member(path, infos[array], f"the .npz array {array!r}", limits)
    assert data is not None
    keys = _npz_member(path, infos.get("keys"), "'keys' in the .npz file", limits)
    labels = _npz_member(path, infos.get("labels"), "'labels' in the .npz file", limits)
    declared = sum(infos[m].file_size for m in {array, "keys", "labels"} if m in infos)
    if declared > limits.max_inflated_bytes:
        raise TooLarge(f"the .npz members read inflate to {declared} bytes; the limit is "
                       f"{limits.max_inflated_bytes} (max_inflated_bytes)")
    return _source("npz", data, keys, labels, limits)


def open_source(path: str, filename: str, options: IngestOptions,
                limits: Limits | None = None) -> Source:
    fmt = format_of(filename)
    limits = limits or Limits()
    if fmt in ("npy", "npz") and (options.key_column or options.label_column
                                  or options.feature_columns):
        raise DatasetError("key_column, label_column and feature_columns apply to "
                           ".parquet and .csv files only")
    if fmt == "npy":
        return open_npy(path, options.keys_path, options.labels_path, limits)
    if options.keys_path or options.labels_path:
        raise DatasetError(f"separate keys/labels files apply to .npy data; a .{fmt} file "
                           "carries its own")
    if fmt == "npz":
        return open_npz(path, options.array, limits)
    from ingest.tables import open_table

    return open_table(path, fmt, options.key_column, options.label_column,
                      options.feature_columns, options.metadata_columns, limits)


def register_file(db: Database, artifacts: ArtifactStore, settings: Settings, name: str,
                  path: str, filename: str | None = None, options: IngestOptions | None = None,
                  source_uri: str | None = None, temp_bytes: int = 0) -> Registered:
    """Ingest the local file `path` (of the type `filename`'s extension names) as `name`;
    `temp_bytes`: what the caller already wrote to temporary files for it (an upload's
    saved parts), counted against `max_upload_temp_bytes`."""
    source = open_source(path, filename or path, options or IngestOptions(),
                         Limits.of(settings))
    return register_dataset(db, artifacts, settings, name, source, source_uri, temp_bytes)


def register_digits(db: Database, artifacts: ArtifactStore, settings: Settings,
                    name: str = "digits") -> Registered:
    """scikit-learn's 8x8 digits scaled to [0, 1], items (1, 8, 8), labels 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    with tempfile.TemporaryDirectory() as tmp:
        data, labels = os.path.join(tmp, "digits.npy"), os.path.join(tmp, "labels.npy")
        np.save(data, images)
        np.save(labels, digits.target.astype(np.int64))
        return register_file(db, artifacts, settings, name, data,
                             options=IngestOptions(labels_path=labels),
                             source_uri="builtin:digits")
