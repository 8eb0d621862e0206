"""Parquet with an image column, as Hugging Face writes image datasets, read a row group at a
time. Every size parquet declares (a row group's, a cell's) is checked before the data is
read or becomes a Python value (docs/internals/ingest.md)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

from ingest.batches import (
    MAX_IMAGE_BYTES,
    MAX_KEY_BYTES,
    MAX_LABEL_CHARS,
    MAX_METADATA_BYTES,
    Encoded,
    image_chunks,
    shown_key,
)
from ingest.plan import IngestOptions, Limits, Location, Plan, Report, Unit
from store.datasets import Chunk
from store.errors import DatasetError, TooLarge

MAX_ROW_GROUP_BYTES = 512 << 20  # declared, every column read
MAX_PATH_KEY_BYTES = 64 << 20  # declared, of the image struct's `path`, all row groups
ROWS_PER_BATCH = 256
_KEY_CELL_BYTES = MAX_KEY_BYTES + 64  # Arrow's offsets and validity besides the text
_LABEL_CELL_BYTES = 4 * MAX_LABEL_CHARS + 64  # UTF-8 is at most 4 bytes a character


def _is_image_type(t: Any) -> str | None:
    import pyarrow as pa

    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_struct(t):
        names = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
        if "bytes" in names and (pa.types.is_binary(names["bytes"])
                                 or pa.types.is_large_binary(names["bytes"])):
            return "struct"
    return None


def image_column_of(schema: Any, wanted: str | None) -> tuple[str, str] | None:
    """(column, "struct" | "binary") for the image column, or None when there is none."""
    if wanted is not None:
        if wanted not in schema.names:
            raise DatasetError(f"image_column {wanted!r} is not a column "
                               f"(columns: {', '.join(schema.names[:20])})")
        kind = _is_image_type(schema.field(wanted).type)
        if kind is None:
            raise DatasetError(f"image_column {wanted!r} is {schema.field(wanted).type}; it "
                               "must be binary or struct<bytes: binary, path: string>")
        return wanted, kind
    for field in schema:
        kind = _is_image_type(field.type)
        if kind is not None:
            return field.name, kind
    return None


@contextlib.contextmanager
def open_parquet(location: Location, as_dictionary: Callable[[str], bool] | None = None,
                 ) -> Iterator[Any]:
    """The file as a pyarrow ParquetFile, closed (its fsspec file too) on leaving.

    `as_dictionary`: which column paths (`label`, `image.bytes`) of text or binary values
    are read as Arrow dictionaries, as parquet stores them: expanded, one 64 MiB value
    repeated in 8 rows is 512 MiB in memory though the file declares 64 MiB."""
    import pyarrow.parquet as pq

    with location.fs.open(location.path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
            if as_dictionary:
                wanted = [c.path for c in pf.schema
                          if as_dictionary(c.path) and c.physical_type == "BYTE_ARRAY"]
                if wanted:
                    f.seek(0)
                    pf = pq.ParquetFile(f, metadata=pf.metadata, read_dictionary=wanted)
        except Exception as exc:  # pyarrow raises its own for a damaged footer
            raise DatasetError(f"{location.display} is not a readable parquet file "
                               f"({type(exc).__name__})") from None
        try:
            yield pf
        finally:
            pf.close()


def _a_struct_path(path: str) -> bool:
    """A top-level struct's `path` child: the one column a plan reads (`_paths_are_keys`)."""
    return path.count(".") == 1 and path.endswith(".path")


def _declared_bytes(meta: Any, group: int, columns: set[str]) -> int:
    """The uncompressed bytes row group `group` declares for `columns` (top-level names,
    a struct's children included)."""
    rg = meta.row_group(group)
    return sum(rg.column(j).total_uncompressed_size for j in range(rg.num_columns)
               if rg.column(j).path_in_schema.split(".")[0] in columns)


def _columns_read(column: str, options: IngestOptions) -> list[str]:
    return [column] + [c for c in dict.fromkeys(
        [options.key_column, options.label_column, *(options.metadata_columns or [])])
        if c is not None and c != column]


def plan_image_parquet(location: Location, options: IngestOptions, limits: Limits) -> Plan:
    with open_parquet(location, _a_struct_path) as pf:
        return _plan(pf, location, options, limits)


def _plan(pf: Any, location: Location, options: IngestOptions, limits: Limits) -> Plan:
    schema = pf.schema_arrow
    found = image_column_of(schema, options.image_column)
    if found is None:
        raise DatasetError(f"{location.display} has no image column (binary or "
                           "struct<bytes, path>); name one with image_column")
    column, kind = found
    for name in [options.label_column, options.key_column, *(options.metadata_columns or [])]:
        if name is not None and name not in schema.names:
            raise DatasetError(f"column {name!r} is not in {location.display}")
    meta = pf.metadata
    if meta.num_rows > limits.max_dataset_items:
        raise TooLarge(f"{location.display} has {meta.num_rows} rows; the limit is "
                       f"{limits.max_dataset_items} (max_dataset_items)")
    units = []
    read = _columns_read(column, options)
    for g in range(meta.num_row_groups):
        size = _declared_bytes(meta, g, set(read))
        if size > MAX_ROW_GROUP_BYTES:
            raise TooLarge(f"row group {g} of {location.display} holds {size} bytes in the "
                           f"columns read ({', '.join(read)}); the limit is "
                           f"{MAX_ROW_GROUP_BYTES} per row group (write it with smaller row "
                           "groups)")
        units.append(Unit(g, f"{location.display}#rg{g}", size, {"group": g}))
    key_mode = "column" if options.key_column else "row"
    path_bytes = sum(meta.row_group(g).column(j).total_uncompressed_size
                     for g in range(meta.num_row_groups)
                     for j in range(meta.row_group(g).num_columns)
                     if meta.row_group(g).column(j).path_in_schema == f"{column}.path")
    if (key_mode == "row" and kind == "struct" and "path" in schema.field(column).type.names
            and path_bytes <= MAX_PATH_KEY_BYTES and _paths_are_keys(pf, column)):
        key_mode = "path"
    starts, total = [], 0
    for g in range(meta.num_row_groups):
        starts.append(total)
        total += meta.row_group(g).num_rows
    for unit, start in zip(units, starts, strict=True):
        unit.extra.update(column=column, kind=kind, key_mode=key_mode, start=start)
    return Plan("image-parquet", location, units, sum(u.size_bytes for u in units),
                meta.num_rows, pixels=True)


def _paths_are_keys(pf: Any, column: str) -> bool:
    """Whether the struct's `path` child (read alone, its bytes are not) is set, non-empty
    and unique in every row. Read as a dictionary (`plan_image_parquet`), so that a path
    repeated in every row is counted from its indices, never expanded row by row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    seen: set[str] = set()
    rows = 0
    for g in range(pf.metadata.num_row_groups):
        try:  # a whole row group: pyarrow reads a struct of dictionaries so, not by batch
            read = pf.read_row_group(g, columns=[f"{column}.path"]).column(0)
        except NotImplementedError:  # pyarrow's ArrowNotImplementedError: row numbers
            return False
        for chunk in read.chunks:
            paths = chunk.flatten()[0]
            if paths.null_count:
                return False
            if pa.types.is_dictionary(paths.type):
                if len(pc.unique(paths.indices)) != len(paths):
                    return False  # a repeat, seen without expanding it
                paths = paths.dictionary.take(paths.indices)
            rows += len(paths)
            seen.update(paths.to_pylist())
            if len(seen) != rows or "" in seen:
                return False
    return True


def _json_safe(value: Any) -> Any:
    """A cell's value as JSON can hold it. A NaN or infinite number becomes null, not a
    failure: pandas writes a missing float as NaN, so refusing it would refuse ordinary
    files, and PostgreSQL's JSON has no NaN. What JSON has no type for (bytes, dates,
    decimals) becomes its str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return str(value)


class _Oversized(ValueError):
    """A cell too big to become a Python value: the row's failure."""


def _cell(array: Any, i: int, limit: int, what: str) -> Any:
    """Row `i` of an Arrow array as a Python value, once its Arrow size (the buffer ranges
    it uses, nested ones too; a dictionary's entry alone) is at most `limit`: a 64 MiB
    label is never copied out."""
    import pyarrow as pa

    if pa.types.is_dictionary(array.type):
        index = array.indices[i].as_py()
        if index is None:
            return None
        array, i = array.dictionary, index
    size = array.slice(i, 1).nbytes
    if size > limit:
        raise _Oversized(f"its {what} is {size} bytes; the limit is {limit}")
    return array[i].as_py()


def _image_parts(images: Any, kind: str) -> tuple[Any, Any]:
    """(bytes, path or None) arrays of an image column's batch."""
    if kind == "binary":
        return images, None
    children = dict(zip([f.name for f in images.type], images.flatten(), strict=True))
    return children["bytes"], children.get("path")


def read_image_parquet(plan: Plan, unit: Unit, options: IngestOptions, limits: Limits,
                       report: Report) -> Iterator[Chunk]:
    column, kind, key_mode = (unit.extra[k] for k in ("column", "kind", "key_mode"))
    names = _columns_read(column, options)
    key_column, label_column = options.key_column, options.label_column
    meta_columns = options.metadata_columns or []

    def items(pf: Any) -> Iterator[Encoded]:
        row = unit.extra["start"]
        for batch in pf.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=[unit.extra["group"]],
                                     columns=names):
            data_col, path_col = _image_parts(batch.column(column), kind)
            for i in range(batch.num_rows):
                key = str(row)
                row += 1
                try:
                    if key_mode == "column":
                        key = str(_cell(batch.column(key_column), i, _KEY_CELL_BYTES, "key"))
                    elif key_mode == "path":
                        key = str(_cell(path_col, i, _KEY_CELL_BYTES, "path"))
                    label = (_cell(batch.column(label_column), i, _LABEL_CELL_BYTES, "label")
                             if label_column else None)
                    meta = ({c: _json_safe(_cell(batch.column(c), i, MAX_METADATA_BYTES,
                                                 f"metadata column {c!r}"))
                             for c in meta_columns} if meta_columns else None)
                    data = _cell(data_col, i, MAX_IMAGE_BYTES + 64, "image cell")
                except _Oversized as exc:
                    report.fail(shown_key(key), str(exc))
                    continue
                except RecursionError:
                    report.fail(shown_key(key), "its metadata is nested too deeply")
                    continue
                if data is None:
                    report.fail(shown_key(key), "the image cell is empty")
                    continue
                if len(data) > MAX_IMAGE_BYTES:
                    report.fail(shown_key(key), f"{len(data)} bytes; the limit for one image "
                                f"is {MAX_IMAGE_BYTES}")
                    continue
                yield Encoded(key, data, None if label is None else str(label), meta)

    # top-level columns only: pyarrow's batches cannot hold a struct of dictionaries
    # ("Nested data conversions not implemented for chunked array outputs")
    with open_parquet(plan.location, set(names).__contains__) as pf:
        yield from image_chunks(items(pf), plan, report, limits.max_image_pixels)
