"""Streamed readers of table files (`.parquet` with numeric or list columns, `.csv`): a
row is an item, its feature columns the values, beside key, label and metadata columns.
Read a row group (parquet) or a block (CSV) at a time; what the file's metadata declares is
checked against the limits first. Split from `ingest.arrays`, whose helpers they share.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ingest.arrays import (
    CSV_BLOCK_BYTES,
    check_declared,
    rows_per_chunk,
)
from ingest.plan import Limits
from store.datasets import Chunk, Source
from store.errors import DatasetError, TooLarge

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


