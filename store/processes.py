"""Processes of this host, told apart for certain: a pid plus its start time names one
process (a pid alone may be reused), and the host identity says where a pid means that."""

from __future__ import annotations

import os
import socket
from functools import cache


@cache
def host_identity() -> str:
    """This host and pid namespace: where a pid means the same process (containers share
    a kernel but not pids)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if it does not exist (or
    has exited and awaits its parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
