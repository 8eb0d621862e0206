"""Where the client finds the API, and which key it sends there: the one rule, which the
`latentbank` CLI's client verbs go by too (they run on this client). `latentbank up` and
`latentbank status` read `stack.json` with service.cli.running.read_stack, the same checks
written again there (this distribution imports nothing of the server's;
tests/service/cli/test_verbs_unit.py holds both readers to the same cases).

A key goes only to a URL the user gave, or to the stack of the user's own data folder,
never to a URL read from elsewhere:

- `url` / `LATENTBANK_URL` (the user's), with `key` / `LATENTBANK_API_KEY`; without a key,
  with the local stack's `admin.key` only if that URL is the stack's own;
- else the stack that `latentbank up` of this user runs from the data folder
  (`LATENTBANK_DATA_DIR`, else `./.latentbank`: the folder every `latentbank` command
  means, `up`, `status` and `demo` too, so a verb never reaches a stack that `status`
  says is not running here): the URL in its `stack.json`, with the user's key or else
  its `admin.key`. A `stack.json` counts only when it and its folder are this user's
  and private, and the process it names is this user's and holds the folder's
  `up.lock` (what `up` holds while it runs), as read from /proc: without /proc (macOS)
  none counts;
- else http://127.0.0.1:8000 without a key (a user's key is withheld: set LATENTBANK_URL
  to send it there).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
STACK_FILE, KEY_FILE, LOCK_FILE = "stack.json", "admin.key", "up.lock"
PROC = Path("/proc")  # where _holds_lock reads who holds a lock (tests move it away)


@dataclass(frozen=True)
class Resolved:
    """The API's URL, the key sent to it, and whether a key the user set was withheld."""

    url: str
    key: str | None
    withheld: bool = False


def data_dir() -> Path:
    """The data folder of the stack meant: LATENTBANK_DATA_DIR, else ./.latentbank (the
    server's rule, store.settings, for `up` and `status`)."""
    return Path(os.environ.get("LATENTBANK_DATA_DIR") or ".latentbank")


def _own_and_private(path: Path) -> bool:
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _holds_lock(pid: int, lock: Path) -> bool:
    """Whether process `pid` (this user's) holds an exclusive flock on `lock`, read from
    /proc. Without /proc (macOS) that cannot be verified, so it is False: a live pid
    proves nothing (a `stack.json` committed to a cloned repository may name pid 1), and
    trusting one would send the user's key to the URL it names; set LATENTBANK_URL and
    LATENTBANK_API_KEY there. service.cli.running's copy answers the same."""
    proc = PROC / str(pid)
    if pid <= 0 or not (PROC / "self" / "fdinfo").is_dir():
        return False
    try:
        if proc.stat().st_uid != os.getuid():
            return False
        for fd in (proc / "fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == str(lock) and any(
                        line.startswith("lock:") and "FLOCK" in line and "WRITE" in line
                        for line in (proc / "fdinfo" / fd.name).read_text().splitlines()):
                    return True
    except OSError:
        return False
    return False


def read_stack(data_dir: Path) -> dict[str, Any] | None:
    """The running stack's `stack.json`, or None unless it is trusted (module docstring)."""
    folder = data_dir.resolve()
    path = folder / STACK_FILE
    try:
        info = json.loads(path.read_text())
        if not (_own_and_private(path) and _own_and_private(folder)):
            return None
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) \
            or not isinstance(info.get("url"), str):
        return None
    if not _holds_lock(info["pid"], folder / LOCK_FILE):
        return None
    return info


def resolve(url: str | None = None, key: str | None = None) -> Resolved:
    """The URL and key by the rules of this module's docstring."""
    user_key = key or os.environ.get("LATENTBANK_API_KEY") or None
    url = url or os.environ.get("LATENTBANK_URL") or None
    own, own_dir = None, None
    running = read_stack(data_dir())
    if running:
        own, own_dir = running["url"].rstrip("/"), data_dir().resolve()
    if url:
        url = url.rstrip("/")
    elif own:
        url = own
    else:
        return Resolved(DEFAULT_URL, None, withheld=user_key is not None)
    chosen = user_key
    if not chosen and url == own and own_dir is not None:
        try:
            chosen = (own_dir / KEY_FILE).read_text().strip() or None
        except OSError:
            chosen = None
    return Resolved(url, chosen)
