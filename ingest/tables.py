"""Streamed readers of table files (`.parquet` with numeric or list columns, `.csv`): a
row is an item, its feature columns the values, beside key, label and metadata columns.
Read a row group (parquet) or a block (CSV) at a time; what the file's metadata declares is
checked against the limits first. Split from `ingest.arrays`, whose helpers they share.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ingest.plan import Limits, check_declared, rows_per_chunk
from store.datasets import Chunk, Source
from store.errors import DatasetError, TooLarge

CSV_BLOCK_BYTES = 4 << 20  # a line must fit one block; each block costs ~4x in the reader

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


@dataclass(frozen=True)
class _Table:
    """An opened table file: its schema, rows (None for a CSV) and batches of named columns."""

    schema: Any
    n_items: int | None
    batches: Callable[[list[str], int], Iterator[Any]]
    parquet: Any = None


def _open_parquet(path: str, limits: Limits) -> _Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"the .parquet file cannot be read: {exc}") from None
    schema = parquet.schema_arrow
    if parquet.metadata.num_columns > limits.max_table_columns:
        raise TooLarge(f"the .parquet file has {parquet.metadata.num_columns} columns; "
                       f"the limit is {limits.max_table_columns} (max_table_columns)")

    def batches(columns: list[str], batch_size: int) -> Iterator[Any]:
        # text columns stay dictionaries until measured (_side_bytes)
        text = [c for c in columns if pa.types.is_string(schema.field(c).type)
                or pa.types.is_binary(schema.field(c).type)]
        reader = pq.ParquetFile(path, read_dictionary=text)
        yield from reader.iter_batches(batch_size=batch_size, columns=columns)

    return _Table(schema, parquet.metadata.num_rows, batches, parquet)


def _open_csv(path: str, limits: Limits) -> _Table:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    _csv_header_columns(path, limits)

    def reader() -> Any:
        try:
            return pacsv.open_csv(path, read_options=pacsv.ReadOptions(
                block_size=CSV_BLOCK_BYTES))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DatasetError(f"the .csv file cannot be read: {exc}") from None

    def batches(columns: list[str], batch_size: int) -> Iterator[Any]:
        try:
            yield from reader()
        except pa.ArrowInvalid as exc:
            raise DatasetError(f"the .csv file is malformed: {exc}") from None

    return _Table(reader().schema, None, batches)


@dataclass(frozen=True)
class _Columns:
    """Which columns are the item (one list column or numeric ones) and which ride beside."""

    features: list[str]
    list_col: str | None
    key: str | None
    label: str | None
    metadata: list[str]

    @property
    def side(self) -> list[str]:
        return sorted(c for c in {self.key, self.label, *self.metadata} if c is not None)


def _columns(schema: Any, fmt: str, key_column: str | None, label_column: str | None,
             feature_columns: Sequence[str] | None, metadata_columns: Sequence[str] | None,
             limits: Limits) -> _Columns:
    """The named columns checked against the schema: each exists, features are numeric
    (or one list column of numbers), side columns hold single values."""
    import pyarrow as pa

    names = list(schema.names)
    if len(names) > limits.max_table_columns:
        raise TooLarge(f"the .{fmt} file has {len(names)} columns; the limit is "
                       f"{limits.max_table_columns} (max_table_columns)")
    for what, col in {"key_column": key_column, "label_column": label_column}.items():
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
    cols = _Columns(features, list_cols[0] if list_cols else None, key_column, label_column,
                    meta_cols)
    for c in cols.side:
        if pa.types.is_nested(schema.field(c).type):
            raise DatasetError(f"column {c!r} has type {schema.field(c).type}; key, label and "
                               "metadata columns must hold single values")
    return cols


def _list_values(col: Any, row: int, name: str, first_width: list[int]) -> np.ndarray:
    """A list column's batch as (rows, width) float64; every row as wide as the first."""
    import pyarrow.compute as pc

    if col.null_count:
        raise DatasetError(f"missing item in column {name!r} near row {row}")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if not first_width:
        first_width.append(int(lengths[0]))
    bad = np.flatnonzero(lengths != first_width[0])
    if len(bad):
        raise DatasetError(f"inconsistent item shape: row {row + int(bad[0])} has "
                           f"{int(lengths[bad[0]])} values, earlier rows {first_width[0]}")
    flat = col.flatten()
    if flat.null_count:
        raise DatasetError(f"missing value inside column {name!r} near row {row}")
    values = flat.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    return values.reshape(len(col), first_width[0])


def _column_values(batch: Any, features: list[str], row: int) -> np.ndarray:
    """Numeric feature columns of a batch side by side as (rows, features) float64."""
    cols = []
    for c in features:
        arr = batch.column(c)
        if arr.null_count:
            bad = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"missing value in column {c!r} at row {row + bad}")
        cols.append(arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False))
    return np.stack(cols, axis=1)


def _side_values(batch: Any, cols: _Columns, row: int) -> tuple[Any, Any, Any]:
    """A batch's keys, labels and metadata (None where no column is named)."""
    keys = labels = metadata = None
    if cols.key is not None:
        key_arr = batch.column(cols.key)
        if key_arr.null_count:
            raise DatasetError(f"missing key in column {cols.key!r} near row {row}")
        keys = [str(k) for k in key_arr.to_pylist()]
    if cols.label is not None:
        labels = [None if v is None else (str(int(v)) if isinstance(v, float)
                                          and v.is_integer() else str(v))
                  for v in batch.column(cols.label).to_pylist()]
    if cols.metadata:
        values = {c: batch.column(c).to_pylist() for c in cols.metadata}
        metadata = [{c: _json_safe(values[c][i]) for c in cols.metadata}
                    for i in range(batch.num_rows)]
    return keys, labels, metadata


def open_table(path: str, fmt: str, key_column: str | None = None,
               label_column: str | None = None, feature_columns: Sequence[str] | None = None,
               metadata_columns: Sequence[str] | None = None,
               limits: Limits | None = None) -> Source:
    """Numeric feature columns (or one list column) become the item; others as named."""
    import pyarrow as pa

    limits = limits or Limits()
    table = _open_parquet(path, limits) if fmt == "parquet" else _open_csv(path, limits)
    cols = _columns(table.schema, fmt, key_column, label_column, feature_columns,
                    metadata_columns, limits)
    types = {c: table.schema.field(c).type for c in cols.features}
    width = max(1, len(cols.features))
    if table.parquet is not None:
        itemsize = max(4, *(_value_type(types[c]).bit_width // 8 for c in cols.features))
        width = _parquet_width(table.parquet, cols.list_col, cols.features, cols.side,
                               itemsize, limits)
    first_width: list[int] = []

    def chunks() -> Iterator[Chunk]:
        row = 0
        wanted = sorted(set(cols.features) | set(cols.side))
        for batch in table.batches(wanted, rows_per_chunk((width,), 8)):
            m = batch.num_rows
            if m == 0:
                continue
            decoded = _side_bytes([batch.column(c) for c in cols.side])
            if decoded > limits.max_side_chunk_bytes:
                raise TooLarge(f"the key, label and metadata columns of rows {row}-{row + m - 1} "
                               f"decode to {decoded} bytes; the limit is "
                               f"{limits.max_side_chunk_bytes} (max_side_chunk_bytes)")
            values = (_list_values(batch.column(cols.list_col), row, cols.list_col, first_width)
                      if cols.list_col else _column_values(batch, cols.features, row))
            yield Chunk(values, *_side_values(batch, cols, row))
            row += m

    shape: tuple[int, ...] = (len(cols.features),)
    if cols.list_col:
        t = types[cols.list_col]
        shape = (t.list_size,) if pa.types.is_fixed_size_list(t) else (-1,)
    return Source(fmt, shape, str(np.dtype(np.float64)), table.n_items, chunks(),
                  key_column is not None, label_column is not None,
                  columns={"features": json.dumps(cols.features), "key": str(key_column),
                           "label": str(label_column)})
