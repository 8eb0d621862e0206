"""Processes of this host, told apart for certain: a pid plus its start time names one
process (a pid alone may be reused), and the host identity (machine, boot and pid
namespace) says where a pid means that."""

from __future__ import annotations

import os
import socket
from functools import cache

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
UNKNOWN = "-"


def _first_line(*paths: str) -> str:
    """The first non-empty line of the first readable file among `paths` ('' if none)."""
    for path in paths:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                value = f.readline().strip()
        except OSError:
            continue
        if value:
            return value
    return ""


@cache
def host_identity() -> str:
    """Where a pid means the same process: `hostname/machine-id/boot-id/pid-namespace`.

    A hostname is not unique (two hosts may share one), nor is a pid namespace's inode
    (the initial namespace has the same inode on every host), so a pid is only compared
    within one boot of one machine: the boot id is drawn at random at each boot, the
    machine id tells cloned hosts apart where their boot ids cannot be read. Containers
    share their host's kernel (and boot id) but not its pids: the namespace tells them
    apart. A part that cannot be read is `-`; without a boot id no pid is judged
    (`identity_is_known`)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = UNKNOWN
    machine = _first_line(*MACHINE_ID_FILES) or UNKNOWN
    boot = _first_line(BOOT_ID_FILE).replace("-", "") or UNKNOWN
    # ':' separates an owner's fields and '/' the identity's: neither may come from a file
    machine, boot = (v.replace(":", "").replace("/", "") or UNKNOWN for v in (machine, boot))
    return f"{socket.gethostname()}/{machine}/{boot}/{namespace}"


def identity_is_known(identity: str) -> bool:
    """Whether an identity names one boot and one pid namespace for certain (its boot id
    and namespace were read): only then may a pid under it be judged."""
    parts = identity.split("/")
    return len(parts) == 4 and parts[2] != UNKNOWN and parts[3] != UNKNOWN


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
