"""A running stack as other processes find it: its `stack.json` (trusted only when this
user's `up` holds the folder's lock), its admin key file, the lock, and its processes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import IO, Any

STACK_FILE = "stack.json"
KEY_FILE = "admin.key"
LOCK_FILE = "up.lock"
PROC = Path("/proc")  # where _holds_lock reads who holds a lock (tests move it away)


def stack_file(data_dir: Path) -> Path:
    return data_dir.resolve() / STACK_FILE


def key_file(data_dir: Path) -> Path:
    return data_dir.resolve() / KEY_FILE


def read_stack(data_dir: Path) -> dict[str, Any] | None:
    """The running stack's description, or None when no `up` of this user runs from
    `data_dir`. The CLI sends keys to the URL it names, so a `stack.json` counts only when
    it and its folder belong to this user and nobody else may write them, and the process
    it names is this user's and holds the folder's lock (what `up` keeps for its life): a
    file planted in a shared or cloned folder, or one left by a killed supervisor whose
    pid was reused, is not a stack."""
    path = stack_file(data_dir)
    try:
        info = json.loads(path.read_text())
        if not (_own_and_private(path) and _own_and_private(path.parent)):
            return None
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return None
    if not _holds_lock(info["pid"], path.parent / LOCK_FILE):
        return None  # left behind by a supervisor that was killed, or not ours
    return info


def _own_and_private(path: Path) -> bool:
    """Owned by this user and not writable by group or others."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def can_verify_stacks() -> bool:
    """Whether this host shows who holds a lock (/proc): without it no stack.json is
    trusted (`_holds_lock`), so `status` cannot see a stack and `demo` cannot start one."""
    return (PROC / "self" / "fdinfo").is_dir()


UNVERIFIABLE = ("this host has no /proc, so the stack's stack.json cannot be verified: "
                "point the client verbs at it with LATENTBANK_URL and LATENTBANK_API_KEY "
                "(DATA_DIR/admin.key)")


def _holds_lock(pid: int, lock: Path) -> bool:
    """Whether process `pid`, run by this user, holds an exclusive flock on `lock`: read
    from /proc (its open files and their fdinfo), never by trying the lock, which would
    make an `up` starting at that instant fail. Without /proc (macOS) that cannot be
    verified, so it is False: a live pid proves nothing (pid 1 is alive everywhere, and
    a `stack.json` committed to a cloned repository is this user's file), and trusting
    one would send the user's key to the URL it names. latentbank_client.config's copy
    answers the same."""
    proc = PROC / str(pid)
    if pid <= 0 or not can_verify_stacks():
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


def try_folder_lock(data_dir: Path) -> IO[str] | None:
    """The folder's `up.lock`, taken (held until the file is closed), or None when a
    running `up` holds it. What a command that must not run beside a stack takes: a
    stack.json that cannot be verified (no /proc) is no proof that none runs."""
    lock = open(data_dir / LOCK_FILE, "a+")  # noqa: SIM115 (the caller closes it)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def stack_processes(data_dir: Path, supervisor_pid: int) -> set[int]:
    """Every live process of the stack run from `data_dir`: the supervisor's descendants
    (worker and its pool, beat, API) and the servers that detach from it (postgres,
    redis-server), found through /proc."""
    found: set[int] = set()
    parents: dict[int, int] = {}
    sock = data_dir / "redis" / "redis.sock"
    markers = [str(data_dir / "postgres"),
               os.path.dirname(os.readlink(sock)) if sock.is_symlink() else str(sock)]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie is gone, only not yet reaped
            continue
        parents[int(entry.name)] = int(fields[1])
        if any(m in cmdline for m in markers) and ("redis-server" in cmdline
                                                   or "postgres" in cmdline):
            found.add(int(entry.name))
    frontier = {supervisor_pid}
    while frontier:
        children = {p for p, pp in parents.items() if pp in frontier} - found
        found |= children
        frontier = children
    return found
