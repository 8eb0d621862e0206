"""Streamed readers of dataset files (`.npy`, `.npz`, `.parquet`, `.csv`) for the API's
dataset routes: they turn a file into the `Source` that `store.datasets` ingests.

Each reader yields `Chunk`s of at most about `CHUNK_BYTES` of item values, so a file of
any size is read in bounded memory. Nothing is unpickled: `.npy` and `.npz` members are
parsed from their headers with `allow_pickle=False` semantics, object arrays refused.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from store.artifacts import ArtifactStore
from store.datasets import Chunk, Registered, Source, register_dataset
from store.db import Database
from store.errors import DatasetError, NotFound, PathNotAllowed, UnsupportedFormat
from store.settings import Settings

CHUNK_BYTES = 16 << 20
FORMATS = (".npy", ".npz", ".parquet", ".csv")


def check_numeric(dtype: np.dtype, what: str) -> None:
    if dtype.hasobject:
        raise DatasetError(f"{what} holds Python objects (a pickled array); only numeric "
                           "arrays are accepted")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
            or dtype == np.bool_):
        raise DatasetError(f"{what} must be numeric (integers, floats or booleans); "
                           f"got dtype {dtype}")


def rows_per_chunk(item_shape: Sequence[int], itemsize: int) -> int:
    return max(1, CHUNK_BYTES // max(1, itemsize * math.prod(item_shape)))


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

def _read_npy_header(f: Any, what: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise DatasetError(f"{what} is not a valid .npy array: {exc}") from None
    return tuple(shape), np.dtype(dtype), bool(fortran)


def _stream_rows(f: Any, shape: tuple[int, ...], dtype: np.dtype, what: str,
                 ) -> Iterator[np.ndarray]:
    item_shape = shape[1:]
    row_bytes = dtype.itemsize * math.prod(item_shape)
    step = rows_per_chunk(item_shape, dtype.itemsize)
    for start in range(0, shape[0], step):
        m = min(step, shape[0] - start)
        buf = f.read(m * row_bytes)
        if len(buf) != m * row_bytes:
            raise DatasetError(f"{what} is truncated: expected {shape[0]} rows")
        yield np.frombuffer(buf, dtype=dtype).reshape(m, *item_shape)


def _side_array(values: np.ndarray | None, n: int | None, what: str) -> np.ndarray | None:
    if values is None:
        return None
    if values.ndim != 1:
        raise DatasetError(f"{what} must be one-dimensional; got shape {list(values.shape)}")
    if n is not None and len(values) != n:
        raise DatasetError(f"{what} has {len(values)} entries but the data has {n} items")
    return values


def _with_side_arrays(arrays: Iterator[np.ndarray], keys: np.ndarray | None,
                      labels: np.ndarray | None) -> Iterator[Chunk]:
    start = 0
    for values in arrays:
        stop = start + len(values)
        yield Chunk(values,
                    key_strings(keys[start:stop]) if keys is not None else None,
                    label_strings(labels[start:stop]) if labels is not None else None)
        start = stop


def _array_shape_checks(shape: tuple[int, ...], dtype: np.dtype, fortran: bool, what: str,
                        ) -> None:
    check_numeric(dtype, what)
    if len(shape) == 0:
        raise DatasetError(f"{what} is a scalar; expected an array with one row per item")
    if fortran and len(shape) > 1:
        raise DatasetError(f"{what} is Fortran-ordered; save it with np.ascontiguousarray")


def open_npy(path: str, keys: np.ndarray | None = None,
             labels: np.ndarray | None = None) -> Source:
    with open(path, "rb") as f:
        shape, dtype, fortran = _read_npy_header(f, "the .npy file")
    _array_shape_checks(shape, dtype, fortran, "the .npy array")
    if len(shape) == 1:
        shape = (shape[0], 1)
    keys = _side_array(keys, shape[0], "keys")
    labels = _side_array(labels, shape[0], "labels")

    def arrays() -> Iterator[np.ndarray]:
        with open(path, "rb") as f:
            _read_npy_header(f, "the .npy file")
            yield from _stream_rows(f, shape, dtype, "the .npy file")

    return Source("npy", shape[1:], str(dtype), shape[0], _with_side_arrays(arrays(), keys, labels),
                  keys is not None, labels is not None)


def load_side_npy(path: str, what: str) -> np.ndarray:
    """A small labels/keys `.npy` (numeric or fixed-width strings), never unpickled."""
    try:
        values = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DatasetError(f"{what}: not a plain .npy array ({exc})") from None
    if values.dtype.kind not in "US":
        check_numeric(values.dtype, what)
    return values


def open_npz(path: str, array: str | None = None) -> Source:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"the .npz file is not a valid zip archive: {exc}") from None
    with archive:
        names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    side = {"keys", "labels"}
    if array is None:
        candidates = [n for n in names if n not in side]
        if len(candidates) != 1:
            raise DatasetError("the .npz file must hold exactly one data array besides "
                               f"'keys' and 'labels' (or name it); found {sorted(names)}")
        array = candidates[0]
    if array not in names:
        raise DatasetError(f"the .npz file has no array {array!r}; found {sorted(names)}")

    def side_array(name: str) -> np.ndarray | None:
        if name not in names:
            return None
        with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
            shape, dtype, _ = _read_npy_header(f, f"'{name}' in the .npz file")
            if dtype.hasobject:
                raise DatasetError(f"'{name}' in the .npz file holds Python objects")
            data = f.read()
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    with zipfile.ZipFile(path) as z, z.open(f"{array}.npy") as f:
        shape, dtype, fortran = _read_npy_header(f, f"'{array}' in the .npz file")
    what = f"the .npz array {array!r}"
    _array_shape_checks(shape, dtype, fortran, what)
    if len(shape) == 1:
        shape = (shape[0], 1)
    keys = _side_array(side_array("keys"), shape[0], "keys")
    labels = _side_array(side_array("labels"), shape[0], "labels")

    def arrays() -> Iterator[np.ndarray]:
        with zipfile.ZipFile(path) as z, z.open(f"{array}.npy") as f:
            _read_npy_header(f, what)
            yield from _stream_rows(f, shape, dtype, what)

    return Source("npz", shape[1:], str(dtype), shape[0],
                  _with_side_arrays(arrays(), keys, labels), keys is not None,
                  labels is not None)


# -- parquet / csv -----------------------------------------------------------------------

def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return value.decode(errors="replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def open_table(path: str, fmt: str, key_column: str | None = None,
               label_column: str | None = None, feature_columns: Sequence[str] | None = None,
               metadata_columns: Sequence[str] | None = None) -> Source:
    """Numeric feature columns (or one list column) become the item; others as named."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DatasetError(f"the .parquet file cannot be read: {exc}") from None
        schema, n_items = parquet.schema_arrow, parquet.metadata.num_rows

        def batches() -> Iterator[Any]:
            width = max(1, len(features) if not list_cols else 1024)
            yield from parquet.iter_batches(batch_size=rows_per_chunk((width,), 8),
                                            columns=sorted(set(features) | (taken - {None})))
    else:
        import pyarrow.csv as pacsv

        def reader() -> Any:
            try:
                return pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=16 << 20))
            except (pa.ArrowInvalid, OSError) as exc:
                raise DatasetError(f"the .csv file cannot be read: {exc}") from None

        schema, n_items = reader().schema, None

        def batches() -> Iterator[Any]:
            try:
                yield from reader()
            except pa.ArrowInvalid as exc:
                raise DatasetError(f"the .csv file is malformed: {exc}") from None

    names = list(schema.names)
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
    first_width: list[int] = []
    dtype = str(np.dtype(np.float64))

    def chunks() -> Iterator[Chunk]:
        row = 0
        for batch in batches():
            m = batch.num_rows
            if m == 0:
                continue
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


@dataclass
class IngestOptions:
    """How to read a file: npz member, table columns, side arrays of keys and labels."""

    array: str | None = None
    key_column: str | None = None
    label_column: str | None = None
    feature_columns: list[str] | None = None
    metadata_columns: list[str] | None = None
    keys_path: str | None = None
    labels_path: str | None = None


def resolve_allowed_path(uri: str, roots: list[Path]) -> str:
    """A server-side file named by a user: it must resolve (symlinks too) inside a root."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "\x00" in path:
        raise PathNotAllowed("a path cannot contain NUL characters")
    if not roots:
        raise PathNotAllowed("registering server-side files is disabled (no allowed roots "
                             "configured: LATENTBANK_ALLOWED_ROOTS)")
    if not os.path.isabs(path):
        raise PathNotAllowed(f"{uri!r} is not an absolute path")
    real = os.path.realpath(path)
    for root in roots:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real, real_root]) == real_root:
            if not os.path.isfile(real):
                raise NotFound(f"{uri!r} is not a file")
            return real
    raise PathNotAllowed(f"{uri!r} is outside the allowed roots")


def open_source(path: str, filename: str, options: IngestOptions) -> Source:
    fmt = format_of(filename)
    if fmt in ("npy", "npz") and (options.key_column or options.label_column
                                  or options.feature_columns):
        raise DatasetError("key_column, label_column and feature_columns apply to "
                           ".parquet and .csv files only")
    if fmt == "npy":
        keys = load_side_npy(options.keys_path, "keys") if options.keys_path else None
        labels = load_side_npy(options.labels_path, "labels") if options.labels_path else None
        return open_npy(path, keys, labels)
    if options.keys_path or options.labels_path:
        raise DatasetError(f"separate keys/labels files apply to .npy data; a .{fmt} file "
                           "carries its own")
    if fmt == "npz":
        return open_npz(path, options.array)
    return open_table(path, fmt, options.key_column, options.label_column,
                      options.feature_columns, options.metadata_columns)


def register_file(db: Database, artifacts: ArtifactStore, settings: Settings, name: str,
                  path: str, filename: str | None = None, options: IngestOptions | None = None,
                  source_uri: str | None = None) -> Registered:
    """Ingest the local file `path` (of the type `filename`'s extension names) as `name`."""
    source = open_source(path, filename or path, options or IngestOptions())
    return register_dataset(db, artifacts, settings, name, source, source_uri)


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
