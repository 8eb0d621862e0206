"""Parquet with an image column, as Hugging Face writes image datasets: a column of
`struct<bytes: binary, path: string>` (or of raw `binary`) beside label and metadata
columns.

The image column is `options.image_column`, else the first column of either type. Keys:
`key_column` when given; else the struct's `path` when every row has one and they are
unique (read alone, at plan time); else the row number. Labels from `label_column`,
metadata from `metadata_columns`. One unit per row group; a row group's image bytes
(declared in the file's metadata) are checked against MAX_ROW_GROUP_BYTES before it is
read.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from ingest.batches import MAX_IMAGE_BYTES, Encoded, image_chunks
from ingest.plan import IngestOptions, Limits, Location, Plan, Report, Unit
from store.datasets import Chunk
from store.errors import DatasetError, TooLarge

MAX_ROW_GROUP_BYTES = 512 << 20
ROWS_PER_BATCH = 256


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
def open_parquet(location: Location) -> Iterator[Any]:
    """The file as a pyarrow ParquetFile, closed (its fsspec file too) on leaving."""
    import pyarrow.parquet as pq

    with location.fs.open(location.path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # pyarrow raises its own for a damaged footer
            raise DatasetError(f"{location.display} is not a readable parquet file "
                               f"({type(exc).__name__})") from None
        try:
            yield pf
        finally:
            pf.close()


def _image_bytes(meta: Any, group: int, column: str) -> int:
    rg = meta.row_group(group)
    return sum(rg.column(j).total_uncompressed_size for j in range(rg.num_columns)
               if rg.column(j).path_in_schema.split(".")[0] == column)


def plan_image_parquet(location: Location, options: IngestOptions, limits: Limits) -> Plan:
    with open_parquet(location) as pf:
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
    for g in range(meta.num_row_groups):
        size = _image_bytes(meta, g, column)
        if size > MAX_ROW_GROUP_BYTES:
            raise TooLarge(f"row group {g} of {location.display} holds {size} bytes of "
                           f"images; the limit is {MAX_ROW_GROUP_BYTES} per row group "
                           "(write it with smaller row groups)")
        units.append(Unit(g, f"{location.display}#rg{g}", size, {"group": g}))
    key_mode = "column" if options.key_column else "row"
    if key_mode == "row" and kind == "struct" and "path" in schema.field(column).type.names:
        paths = _paths(pf, column)
        if paths.null_count == 0 and len(set(paths.to_pylist())) == len(paths) and all(
                paths.to_pylist()):
            key_mode = "path"
    starts, total = [], 0
    for g in range(meta.num_row_groups):
        starts.append(total)
        total += meta.row_group(g).num_rows
    for unit, start in zip(units, starts, strict=True):
        unit.extra.update(column=column, kind=kind, key_mode=key_mode, start=start)
    return Plan("image-parquet", location, units, sum(u.size_bytes for u in units),
                meta.num_rows, pixels=True)


def _paths(pf: Any, column: str) -> Any:
    """The struct's `path` child alone (its bytes are not read)."""
    import pyarrow as pa

    parts = [pf.read_row_group(g, columns=[f"{column}.path"]).column(0)
             for g in range(pf.metadata.num_row_groups)]
    merged = pa.chunked_array([c for p in parts for c in p.chunks],
                              type=parts[0].type if parts else None).combine_chunks()
    return merged.field("path")


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def read_image_parquet(plan: Plan, unit: Unit, options: IngestOptions, limits: Limits,
                       report: Report) -> Iterator[Chunk]:
    column, kind, key_mode = (unit.extra[k] for k in ("column", "kind", "key_mode"))
    names = [column] + [c for c in dict.fromkeys(
        [options.key_column, options.label_column, *(options.metadata_columns or [])])
        if c is not None and c != column]
    def items(pf: Any) -> Iterator[Encoded]:
        row = unit.extra["start"]
        for batch in pf.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=[unit.extra["group"]],
                                     columns=names):
            table = batch.to_pydict()
            for i, image in enumerate(table[column]):
                if kind == "struct":
                    data, path = (image or {}).get("bytes"), (image or {}).get("path")
                else:
                    data, path = image, None
                if key_mode == "column":
                    key = str(table[options.key_column][i])
                elif key_mode == "path":
                    key = str(path)
                else:
                    key = str(row)
                row += 1
                if data is None:
                    report.fail(key, "the image cell is empty")
                    continue
                if len(data) > MAX_IMAGE_BYTES:
                    report.fail(key, f"{len(data)} bytes; the limit for one image is "
                                f"{MAX_IMAGE_BYTES}")
                    continue
                label = table[options.label_column][i] if options.label_column else None
                meta = ({c: _json_safe(table[c][i]) for c in options.metadata_columns}
                        if options.metadata_columns else None)
                yield Encoded(key, data, None if label is None else str(label), meta)

    with open_parquet(plan.location) as pf:
        yield from image_chunks(items(pf), plan, report, limits.max_image_pixels)
