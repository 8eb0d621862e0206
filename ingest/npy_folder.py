"""Stand-ins the jobs branch needs until the readers' own arrive (the integrator drops
this module): `local_location`, a `resolve_location` for paths under the allowed roots
(files and folders), and a folder of `.npy` files as a multi-unit source (one unit per
file, keys `<file stem>/<row>`), which gives ingest jobs something to resume.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import fsspec

from ingest.arrays import open_npy, resolve_allowed_path
from ingest.plan import IngestOptions, Limits, Location, Plan, Report, Unit
from store.datasets import Chunk
from store.errors import DatasetError, NotFound, PathNotAllowed
from store.settings import Settings

FORMAT = "npy-folder"


def local_location(uri: str, settings: Settings) -> Location:
    """A file or folder under the allowed roots (symlinks resolved), as a Location."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in path:
        raise PathNotAllowed(f"{uri!r}: URLs are not readable here yet (a path under the "
                             "allowed roots is)")
    real = os.path.realpath(path) if os.path.isabs(path) else path
    if os.path.isdir(real):
        for root in settings.allowed_roots:
            real_root = os.path.realpath(root)
            if os.path.commonpath([real, real_root]) == real_root:
                return Location(fsspec.filesystem("file"), real,
                                os.path.basename(real.rstrip("/")) or real)
    real = resolve_allowed_path(uri, settings.allowed_roots)
    return Location(fsspec.filesystem("file"), real, os.path.basename(real))


def plan_npy_folder(location: Location, options: IngestOptions, limits: Limits,
                    ) -> Plan | None:
    """A folder holding `.npy` files only, one unit per file (sorted by name); None for
    anything else (left to `plan_source`)."""
    if not location.fs.isdir(location.path):
        return None
    names = sorted(os.listdir(location.path))
    if not names or not all(n.endswith(".npy") for n in names):
        return None
    if len(names) > limits.max_dataset_items:
        raise DatasetError(f"the folder holds {len(names)} files")
    units = []
    for i, name in enumerate(names):
        path = os.path.join(location.path, name)
        if not os.path.isfile(path):
            raise NotFound(f"{name!r} in the folder is not a file")
        units.append(Unit(i, name, os.path.getsize(path), {"path": path}))
    return Plan(FORMAT, location, units, sum(u.size_bytes for u in units))


def read_npy_unit(plan: Plan, unit: Unit, options: IngestOptions, limits: Limits,
                  report: Report) -> Iterator[Chunk]:
    stem, row = unit.name[:-len(".npy")], 0
    for chunk in open_npy(unit.extra["path"], limits=limits).chunks:
        chunk.keys = [f"{stem}/{row + j}" for j in range(len(chunk.values))]
        row += len(chunk.values)
        report.read += len(chunk.values)
        yield chunk
