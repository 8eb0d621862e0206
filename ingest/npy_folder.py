"""A local folder of `.npy` files (nothing else) as one dataset: a multi-unit source, one
unit per file in name order, keys `<file stem>/<row>`. What a job does with arrays too
large for one file (and what the ingest jobs' resume tests read); `ingest.readers.detect`
would take such a folder for images, so the ingest job asks this module first.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from ingest.arrays import open_npy
from ingest.plan import IngestOptions, Limits, Location, Plan, Report, Unit
from store.datasets import Chunk
from store.errors import DatasetError, NotFound

FORMAT = "npy-folder"


def plan_npy_folder(location: Location, options: IngestOptions, limits: Limits,
                    ) -> Plan | None:
    """A folder holding `.npy` files only, one unit per file (sorted by name); None for
    anything else (left to `plan_source`)."""
    if options.format is not None or not location.is_local or not os.path.isdir(
            location.path):
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
