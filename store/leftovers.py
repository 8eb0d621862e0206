"""The temporary files of uploads and ingests (named `[ingest-]<pid>-...`), and removing
those whose process died mid-way."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from store.processes import pid_alive

LEFTOVER_PREFIX = "ingest-"  # then the writing process's pid: `ingest-<pid>-...`


def sweep_leftovers(*folders: str | Path | None) -> list[str]:
    """Remove the temporary files and folders named `[ingest-]<pid>-...` in `folders`
    whose process no longer runs (an upload or ingest killed mid-way). Another live
    process's files are left alone. Returns what was removed."""
    removed = []
    pattern = re.compile(rf"^(?:{LEFTOVER_PREFIX})?(\d+)-")
    for folder in folders:
        if folder is None or not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            match = pattern.match(entry.name)
            if match is None or pid_alive(int(match.group(1))):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            removed.append(entry.path)
    return removed
