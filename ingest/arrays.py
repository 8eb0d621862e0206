"""Streamed readers of array files (`.npy`, `.npz`, `.parquet`, `.csv`): they turn a file
into the `Source` that `store.datasets` ingests.

Each reader yields `Chunk`s of at most about `CHUNK_BYTES` of item values, so a file of
any size is read in bounded memory. Nothing is unpickled: `.npy` and `.npz` members are
parsed from their headers with `allow_pickle=False` semantics, object arrays refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ingest.paths import resolve_allowed_path  # noqa: F401 - its old home, for callers
from ingest.plan import IngestOptions, Limits
from store.artifacts import ArtifactStore
from store.datasets import Chunk, Registered, Source, register_dataset
from store.db import Database
from store.errors import DatasetError, TooLarge, UnsupportedFormat
from store.settings import Settings

CHUNK_BYTES = 16 << 20
MAX_CHUNK_ROWS = 65_536
MAX_NPZ_MEMBERS = 256
CSV_BLOCK_BYTES = 4 << 20  # a line must fit one block; each block costs ~4x in the reader
FORMATS = (".npy", ".npz", ".parquet", ".csv")


def check_numeric(dtype: np.dtype, what: str) -> None:
    if dtype.hasobject:
        raise DatasetError(f"{what} holds Python objects (a pickled array); only numeric "
                           "arrays are accepted")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
            or dtype == np.bool_):
        raise DatasetError(f"{what} must be numeric (integers, floats or booleans); "
                           f"got dtype {dtype}")


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
    side = {"keys", "labels"}
    if array is None:
        candidates = [n for n in names if n not in side]
        if len(candidates) != 1:
            raise DatasetError("the .npz file must hold exactly one data array besides "
                               f"'keys' and 'labels' (or name it); found {names}")
        array = candidates[0]
    if array not in infos:
        raise DatasetError(f"the .npz file has no array {array!r}; found {names}")

    def member(name: str, what: str) -> _Member | None:
        info = infos.get(name)
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

    data = member(array, f"the .npz array {array!r}")
    assert data is not None
    keys = member("keys", "'keys' in the .npz file")
    labels = member("labels", "'labels' in the .npz file")
    declared = sum(infos[m].file_size for m in {array, "keys", "labels"} if m in infos)
    if declared > limits.max_inflated_bytes:
        raise TooLarge(f"the .npz members read inflate to {declared} bytes; the limit is "
                       f"{limits.max_inflated_bytes} (max_inflated_bytes)")
    return _source("npz", data, keys, labels, limits)


# -- parquet / csv -----------------------------------------------------------------------

def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return value.decode(errors="replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _csv_header_columns(path: str, limits: Limits) -> None:
    """Counts the first line's fields before the CSV reader sees it: the reader's schema
    costs about 8 KiB per column, so a long header line is refused here, unread by it."""
    count, seen = 1, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            end = block.find(b"\n")
            count += (block if end < 0 else block[:end]).count(b",")
            if count > limits.max_table_columns:
                raise TooLarge(f"the .csv file has more than {limits.max_table_columns} "
                               "columns (max_table_columns)")
            seen += len(block)
            if end >= 0 or not block:
                return
            if seen > CSV_BLOCK_BYTES:
                raise DatasetError(f"the first line of the .csv file is longer than "
                                   f"{CSV_BLOCK_BYTES} bytes")


def _parquet_width(parquet: Any, list_col: str | None, features: Sequence[str],
                   side: Sequence[str], itemsize: int, limits: Limits) -> int:
    """The item width the file's metadata declares, checked before any value is decoded:
    a list column's values per row group (num_values) over its rows must be one width
    within the limits (so a single row of 50M values is refused unread), the values in all
    within `max_inflated_bytes`, and each key/label/metadata column chunk's uncompressed
    size within `max_side_chunk_bytes`."""
    meta = parquet.metadata
    leaves: dict[str, list[int]] = {}
    for j in range(meta.num_columns):
        path = meta.schema.column(j).path
        for c in (*features, *side):
            if path == c or path.startswith(c + "."):
                leaves.setdefault(c, []).append(j)
    width = None if list_col else len(features)
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        rows = group.num_rows
        if list_col and rows > 0:
            values = sum(group.column(j).num_values for j in leaves.get(list_col, []))
            if values // rows > limits.max_item_values:
                raise TooLarge(f"row group {i} of column {list_col!r} holds {values} values "
                               f"for {rows} rows: items have at least {values // rows} values "
                               f"each; the limit is {limits.max_item_values} (max_item_values)")
            if values % rows or (width is not None and values != rows * width):
                raise DatasetError(f"inconsistent item shape: row group {i} of column "
                                   f"{list_col!r} holds {values} values for {rows} rows"
                                   + (f", earlier rows {width} each" if width else ""))
            width = values // rows if width is None else width
        for c in side:
            size = sum(group.column(j).total_uncompressed_size for j in leaves.get(c, []))
            if size > limits.max_side_chunk_bytes:
                raise TooLarge(f"column {c!r} holds {size} bytes in row group {i}; the limit "
                               f"is {limits.max_side_chunk_bytes} (max_side_chunk_bytes): "
                               "write the file with smaller row groups")
    width = max(1, width or 1)
    check_declared(meta.num_rows, (width,), itemsize, limits, "the .parquet file")
    return width


def _value_type(t: Any) -> Any:
    """A list column's value type, else the column's own."""
    return t.value_type if hasattr(t, "value_type") else t


def _side_bytes(arrays: Sequence[Any]) -> int:
    """What a batch's key/label/metadata columns decode to (text read as dictionaries
    is measured through its dictionary: a long string repeated is not expanded here)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for arr in arrays:
        if pa.types.is_dictionary(arr.type) and (pa.types.is_string(arr.type.value_type) or
                                                 pa.types.is_binary(arr.type.value_type)):
            lengths = pc.take(pc.binary_length(arr.dictionary), arr.indices)
            total += int(pc.sum(lengths).as_py() or 0)
        else:
            total += arr.nbytes
    return total


def open_table(path: str, fmt: str, key_column: str | None = None,
               label_column: str | None = None, feature_columns: Sequence[str] | None = None,
               metadata_columns: Sequence[str] | None = None,
               limits: Limits | None = None) -> Source:
    """Numeric feature columns (or one list column) become the item; others as named."""
    import pyarrow as pa
    import pyarrow.compute as pc

    limits = limits or Limits()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DatasetError(f"the .parquet file cannot be read: {exc}") from None
        schema, n_items = parquet.schema_arrow, parquet.metadata.num_rows
        if parquet.metadata.num_columns > limits.max_table_columns:
            raise TooLarge(f"the .parquet file has {parquet.metadata.num_columns} columns; "
                           f"the limit is {limits.max_table_columns} (max_table_columns)")

        def batches() -> Iterator[Any]:
            # text side columns stay dictionaries until measured (_side_bytes)
            text = [c for c in side if pa.types.is_string(schema.field(c).type)
                    or pa.types.is_binary(schema.field(c).type)]
            reader = pq.ParquetFile(path, read_dictionary=text)
            yield from reader.iter_batches(batch_size=rows_per_chunk((width,), 8),
                                           columns=sorted(set(features) | set(side)))
    else:
        import pyarrow.csv as pacsv

        _csv_header_columns(path, limits)

        def reader() -> Any:
            try:
                return pacsv.open_csv(path, read_options=pacsv.ReadOptions(
                    block_size=CSV_BLOCK_BYTES))
            except (pa.ArrowInvalid, OSError) as exc:
                raise DatasetError(f"the .csv file cannot be read: {exc}") from None

        schema, n_items = reader().schema, None

        def batches() -> Iterator[Any]:
            try:
                yield from reader()
            except pa.ArrowInvalid as exc:
                raise DatasetError(f"the .csv file is malformed: {exc}") from None

    names = list(schema.names)
    if len(names) > limits.max_table_columns:
        raise TooLarge(f"the .{fmt} file has {len(names)} columns; the limit is "
                       f"{limits.max_table_columns} (max_table_columns)")
    named = {"key_column": key_column, "label_column": label_column}
    for what, col in named.items():
        if col is not None and col not in names:
            raise DatasetError(f"{what} {col!r} is not a column; columns: {names}")
    meta_cols = list(metadata_columns or [])
    for col in meta_cols:
        if col not in names:
            raise DatasetError(f"metadata column {col!r} is not a column; columns: {names}")
    taken = {key_column, label_column, *meta_cols}
    if feature_columns:
        missing = [c for c in feature_columns if c not in names]
        if missing:
            raise DatasetError(f"feature column(s) {missing} are not columns; columns: {names}")
        features = list(feature_columns)
    else:
        features = [c for c in names if c not in taken]
    if not features:
        raise DatasetError("no feature columns left after the key, label and metadata columns")
    types = {c: schema.field(c).type for c in features}
    list_cols = [c for c, t in types.items() if pa.types.is_list(t) or pa.types.is_large_list(t)
                 or pa.types.is_fixed_size_list(t)]
    if list_cols and len(features) > 1:
        raise DatasetError(f"a list column ({list_cols[0]!r}) must be the only feature column; "
                           f"found {features}")
    for c, t in types.items():
        inner = t.value_type if c in list_cols else t
        if not (pa.types.is_integer(inner) or pa.types.is_floating(inner)
                or pa.types.is_boolean(inner)):
            raise DatasetError(f"column {c!r} has type {t}; features must be numeric (name it "
                               "as key_column, label_column or metadata_columns, or leave it out)")
    side = sorted(c for c in taken if c is not None)
    for c in side:
        if pa.types.is_nested(schema.field(c).type):
            raise DatasetError(f"column {c!r} has type {schema.field(c).type}; key, label and "
                               "metadata columns must hold single values")
    width = max(1, len(features))
    if fmt == "parquet":
        itemsize = max(4, *(_value_type(types[c]).bit_width // 8 for c in features))
        width = _parquet_width(parquet, list_cols[0] if list_cols else None, features, side,
                               itemsize, limits)
    first_width: list[int] = []
    dtype = str(np.dtype(np.float64))

    def chunks() -> Iterator[Chunk]:
        row = 0
        for batch in batches():
            m = batch.num_rows
            if m == 0:
                continue
            decoded = _side_bytes([batch.column(c) for c in side])
            if decoded > limits.max_side_chunk_bytes:
                raise TooLarge(f"the key, label and metadata columns of rows {row}-{row + m - 1} "
                               f"decode to {decoded} bytes; the limit is "
                               f"{limits.max_side_chunk_bytes} (max_side_chunk_bytes)")
            if list_cols:
                col = batch.column(list_cols[0])
                if col.null_count:
                    raise DatasetError(f"missing item in column {list_cols[0]!r} near row {row}")
                lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
                if not first_width:
                    first_width.append(int(lengths[0]))
                bad = np.flatnonzero(lengths != first_width[0])
                if len(bad):
                    raise DatasetError(f"inconsistent item shape: row {row + int(bad[0])} has "
                                       f"{int(lengths[bad[0]])} values, earlier rows "
                                       f"{first_width[0]}")
                flat = col.flatten()
                if flat.null_count:
                    raise DatasetError(f"missing value inside column {list_cols[0]!r} "
                                       f"near row {row}")
                values = flat.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
                values = values.reshape(m, first_width[0])
            else:
                cols = []
                for c in features:
                    arr = batch.column(c)
                    if arr.null_count:
                        bad = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
                        raise DatasetError(f"missing value in column {c!r} at row {row + bad}")
                    cols.append(arr.to_numpy(zero_copy_only=False).astype(np.float64,
                                                                        copy=False))
                values = np.stack(cols, axis=1)
            keys = labels = metadata = None
            if key_column is not None:
                key_arr = batch.column(key_column)
                if key_arr.null_count:
                    raise DatasetError(f"missing key in column {key_column!r} near row {row}")
                keys = [str(k) for k in key_arr.to_pylist()]
            if label_column is not None:
                labels = [None if v is None else (str(int(v)) if isinstance(v, float)
                                                  and v.is_integer() else str(v))
                          for v in batch.column(label_column).to_pylist()]
            if meta_cols:
                cols = {c: batch.column(c).to_pylist() for c in meta_cols}
                metadata = [{c: _json_safe(cols[c][i]) for c in meta_cols} for i in range(m)]
            yield Chunk(values, keys, labels, metadata)
            row += m

    shape: tuple[int, ...]
    if list_cols:
        t = types[list_cols[0]]
        shape = (t.list_size,) if pa.types.is_fixed_size_list(t) else (-1,)
    else:
        shape = (len(features),)
    return Source(fmt, shape, dtype, n_items, chunks(), key_column is not None,
                  label_column is not None,
                  columns={"features": json.dumps(features), "key": str(key_column),
                           "label": str(label_column)})


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
