"""Which reader a source gets, and the dispatch behind `ingest.plan`'s functions (the rules:
docs/internals/ingest.md)."""

from __future__ import annotations

import contextlib
import importlib
import os
import posixpath
import tempfile
import weakref
from collections.abc import Callable, Iterator

from ingest.images import ImageSpec
from ingest.plan import IngestOptions, Limits, Location, Plan, Report, Unit
from store.datasets import Chunk, Source
from store.errors import DatasetError, TooLarge, UnsupportedFormat

ARRAY_FORMATS = ("npy", "npz", "parquet", "csv")
IMAGE_FORMATS = ("images", "zip", "tar", "webdataset", "image-parquet", "idx")
FORMATS = ARRAY_FORMATS + IMAGE_FORMATS
PEEK_MEMBERS = 16


def _peek_tar(location: Location) -> list[str]:
    """The first regular members' names, through the checked tar reader (a long-name or
    pax header bomb is refused here too, before the format is even decided)."""
    import tarfile

    from ingest.tarfiles import TarRefused, open_tar

    names: list[str] = []
    try:
        with location.fs.open(location.path, "rb") as f, open_tar(f) as tf:
            for member in tf:
                if member.isreg():
                    names.append(member.name.removeprefix("./"))
                if len(names) >= PEEK_MEMBERS:
                    break
    except TarRefused as exc:
        raise type(exc)(f"{location.display}: {exc}") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(f"{location.display} is not a readable tar archive "
                           f"({type(exc).__name__})") from None
    return names


def _magic(location: Location) -> bytes:
    try:
        with location.fs.open(location.path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def detect(location: Location, options: IngestOptions) -> str:
    from ingest.idx import is_idx_name
    from ingest.paths import has_brace
    from ingest.webdataset import looks_like_webdataset

    if options.format is not None:
        if options.format not in FORMATS:
            raise UnsupportedFormat(f"format {options.format!r} is not one of "
                                    f"{', '.join(FORMATS)}")
        return options.format
    fs, path = location.fs, location.path
    if has_brace(path):
        return "webdataset"
    if fs.isdir(path):
        files = [p for p in fs.find(path) if not posixpath.basename(p).startswith(".")]
        if files and all(p.lower().endswith(".tar") for p in files):
            return "webdataset"
        return "images"
    lower = path.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset" if looks_like_webdataset(_peek_tar(location)) else "tar"
    if is_idx_name(path):
        return "idx"
    if lower.endswith(".parquet"):
        from ingest.imageparquet import image_column_of, open_parquet

        with open_parquet(location) as pf:
            found = image_column_of(pf.schema_arrow, options.image_column)
        return "image-parquet" if found else "parquet"
    ext = posixpath.splitext(lower)[1][1:]
    if ext in ARRAY_FORMATS:
        return ext
    if _magic(location) == b"\x00\x00\x08\x03":
        return "idx"
    raise UnsupportedFormat(
        f"{location.display}: unsupported source {posixpath.splitext(lower)[1] or '(none)'!r}; "
        "give a folder of images, .zip, .tar, .tar.gz, WebDataset shards, an image-column "
        ".parquet, IDX, or an array file (.npy, .npz, .parquet, .csv)")


def _plan_array(location: Location, options: IngestOptions, limits: Limits) -> Plan:
    size = int(location.fs.size(location.path))
    if not location.is_local and size > limits.max_temp_bytes:
        raise TooLarge(f"{location.display} is {size} bytes; a remote array file is copied "
                       f"first, and the limit is {limits.max_temp_bytes} "
                       "(max_upload_temp_bytes)")
    fmt = options.format or posixpath.splitext(location.path.lower())[1][1:]
    return Plan(fmt, location, [Unit(0, location.display, size)], size)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _copy_local(plan: Plan, limits: Limits) -> str:
    """A remote array file's bounded local copy, named `ingest-<pid>-...` (a killed
    process's copy is swept); the caller removes it."""
    from store.leftovers import LEFTOVER_PREFIX

    location = plan.location
    if limits.temp_dir:
        os.makedirs(limits.temp_dir, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"{LEFTOVER_PREFIX}{os.getpid()}-",
                                suffix=f".{plan.format}", dir=limits.temp_dir)
    try:
        copied = 0
        with os.fdopen(fd, "wb") as out, location.fs.open(location.path, "rb") as f:
            while block := f.read(8 << 20):
                copied += len(block)
                if copied > limits.max_temp_bytes:
                    raise TooLarge(f"{location.display} is more than {limits.max_temp_bytes} "
                                   "bytes (max_upload_temp_bytes)")
                out.write(block)
    except BaseException:
        _unlink(path)
        raise
    return path


def open_array(plan: Plan, options: IngestOptions, limits: Limits, report: Report) -> Source:
    """An array file's Source (its reader's own shape and dtype), its chunks counted in
    `report`. A remote file is copied once, here; the copy goes when the chunks are done
    (or dropped unread)."""
    from ingest.arrays import open_source

    local = plan.location.is_local
    path = plan.location.path if local else _copy_local(plan, limits)
    try:
        source = open_source(path, f"x.{plan.format}", options, limits)
    except BaseException:
        if not local:
            _unlink(path)
        raise
    inner = source.chunks

    def counted() -> Iterator[Chunk]:
        try:
            for chunk in inner:
                report.read += len(chunk.values)
                yield chunk
        finally:
            if not local:
                _unlink(path)

    source.chunks = counted()
    if not local:
        weakref.finalize(source.chunks, _unlink, path)
    return source


def _read_array(plan: Plan, unit: Unit, options: IngestOptions, limits: Limits,
                report: Report) -> Iterator[Chunk]:
    yield from open_array(plan, options, limits, report).chunks


Planner = Callable[[Location, IngestOptions, Limits], Plan]
Reader = Callable[[Plan, Unit, IngestOptions, Limits, Report], Iterator[Chunk]]


# each image format's planner and reader, imported when first asked for (Pillow, pyarrow)
_IMAGE_READERS = {"images": ("ingest.folders", "plan_folder", "read_folder"),
                  "zip": ("ingest.folders", "plan_zip", "read_zip"),
                  "tar": ("ingest.folders", "plan_tar", "read_tar"),
                  "webdataset": ("ingest.webdataset", "plan_webdataset", "read_shard"),
                  "image-parquet": ("ingest.imageparquet", "plan_image_parquet",
                                    "read_image_parquet"),
                  "idx": ("ingest.idx", "plan_idx", "read_idx")}


def readers(fmt: str) -> tuple[Planner, Reader]:
    if fmt in ARRAY_FORMATS:
        return _plan_array, _read_array
    if fmt not in _IMAGE_READERS:
        raise UnsupportedFormat(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    module, plan, read = _IMAGE_READERS[fmt]
    found = importlib.import_module(module)
    return getattr(found, plan), getattr(found, read)


def failure_summary(report: Report, limit: int = 5) -> str:
    named = "; ".join(f"{f['key']}: {f['reason']}" for f in report.failures[:limit])
    return named or "none named"


def refuse_failures(report: Report, max_share: float, display: str) -> None:
    """DatasetError, with the report's first failures, when nothing could be read or the
    share of failures passes `max_share`: the one rule for a source read whole
    (`source_of`) and one read unit by unit (the ingest job)."""
    if report.read == 0:
        raise DatasetError(f"{display}: no item could be read ({report.failed} failed, "
                           f"{report.skipped} skipped as not images); first failures: "
                           f"{failure_summary(report)}")
    if report.share > max_share:
        raise DatasetError(
            f"{report.failed} of {report.read + report.failed} items could not be read "
            f"({report.share:.1%}, more than the allowed {max_share:.1%}: "
            f"max_failure_share); first failures: {failure_summary(report)}")


def plan_source(location: Location, options: IngestOptions, limits: Limits) -> Plan:
    """The source's plan: its format (see `detect`) and units."""
    fmt = detect(location, options)
    plan = readers(fmt)[0](location, options, limits)
    if plan.pixels and plan.image is None:
        plan.image = options.image or ImageSpec()
        if plan.image.size is not None:
            plan.item_shape = (plan.image.channels, *plan.image.size)
    return plan


def read_unit(plan: Plan, unit: Unit, options: IngestOptions, limits: Limits,
              report: Report) -> Iterator[Chunk]:
    """The unit's chunks, in order; unreadable items recorded in `report`."""
    return readers(plan.format)[1](plan, unit, options, limits, report)


def source_of(plan: Plan, options: IngestOptions, limits: Limits, report: Report) -> Source:
    """Every unit's chunks as one Source. After the last chunk (still inside the
    iteration, so `register_dataset` rolls back) a source whose share of failures passes
    `options.max_failure_share`, or that has no readable item, is refused with the report's
    counts and first failures (DatasetError, 422)."""
    if plan.format in ARRAY_FORMATS:
        return open_array(plan, options, limits, report)

    def chunks() -> Iterator[Chunk]:
        for unit in plan.units:
            yield from read_unit(plan, unit, options, limits, report)
        refuse_failures(report, options.max_failure_share, plan.location.display)

    return Source(plan.format, plan.item_shape or (), "uint8" if plan.pixels else "float32",
                  None, chunks(), has_keys=True, has_labels=False, pixels=plan.pixels)
