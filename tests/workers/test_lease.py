"""Owner identities: a dead process is told apart from a live one, a reused pid from its
first owner, and another host's owner (even one with the same hostname and pid namespace
inode) is never judged here."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from store.processes import host_identity, process_start
from workers.lease import new_owner, owner_is_dead


def test_a_live_process_is_not_dead():
    assert not owner_is_dead(new_owner())


def test_an_exited_process_is_dead():
    child = subprocess.Popen([sys.executable, "-c",
                              "from workers.lease import new_owner; print(new_owner())"],
                             stdout=subprocess.PIPE, text=True)
    owner = child.communicate()[0].strip()
    assert owner.split(":")[-3] == str(child.pid)
    assert owner_is_dead(owner)


def test_a_reused_pid_is_not_its_first_owner():
    """The same pid with another start time is another process: the owner is dead."""
    host, pid, start, suffix = new_owner().rsplit(":", 3)
    assert int(start) == process_start(os.getpid())
    assert owner_is_dead(f"{host}:{pid}:{int(start) - 1}:{suffix}")


def test_owners_elsewhere_or_of_an_older_format_are_left_to_their_lease():
    host, pid, start, suffix = new_owner().rsplit(":", 3)
    assert not owner_is_dead(f"another-host/1:{pid}:{int(start) - 1}:{suffix}")
    assert not owner_is_dead(f"{host}:999999999:{start}:{suffix}".replace(
        host_identity(), host_identity() + "0"))
    assert not owner_is_dead(f"myhost:{pid}:abcdef12")  # the first wave's format
    assert not owner_is_dead("not an owner")


def _dead_pid_owner():
    """An owner of this identity whose process has exited."""
    child = subprocess.Popen([sys.executable, "-c",
                              "from workers.lease import new_owner; print(new_owner())"],
                             stdout=subprocess.PIPE, text=True)
    return child.communicate()[0].strip()


def test_the_identity_names_this_machine_boot_and_pid_namespace():
    """Read independently of the code: hostname, /etc/machine-id, the boot id, the inode
    of this process's pid namespace."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip().replace("-", "")
    ids = [Path(p).read_text().strip() for p in ("/etc/machine-id", "/var/lib/dbus/machine-id")
           if Path(p).exists()]
    machine = next((v for v in ids if v), "-")
    namespace = os.stat("/proc/self/ns/pid").st_ino
    assert host_identity() == f"{socket.gethostname()}/{machine}/{boot}/{namespace}"
    assert new_owner().startswith(host_identity() + ":")


def test_a_namesake_host_in_its_initial_pid_namespace_is_left_to_its_lease():
    """Two hosts with the same hostname, each worker in its host's initial pid namespace
    (the same inode on every host): the other host's owner names a pid that does not
    exist here, yet it is alive there. Only the machine and boot ids tell them apart."""
    dead_here = _dead_pid_owner()
    assert owner_is_dead(dead_here)  # of this machine and boot: judged
    identity, rest = dead_here.split(":", 1)
    hostname, *middle, namespace = identity.split("/")
    assert hostname == socket.gethostname()
    assert namespace == str(os.stat("/proc/self/ns/pid").st_ino)
    # the namesake host writes the same hostname and namespace inode, its own ids between
    namesake = "/".join([hostname, *("f" * len(part) for part in middle), namespace])
    assert not owner_is_dead(f"{namesake}:{rest}")
    # another boot of this machine: the pid is not the same process either
    if middle:
        rebooted = "/".join([hostname, middle[0], "0" * 32, namespace])
        assert not owner_is_dead(f"{rebooted}:{rest}")


def test_without_a_boot_id_no_pid_is_judged(monkeypatch):
    """Where the boot id cannot be read, an identity cannot tell boots apart: every owner
    is left to its lease, even one that names a pid that has exited."""
    import workers.lease as lease

    owner = _dead_pid_owner()
    identity, rest = owner.split(":", 1)
    hostname, machine, _, namespace = identity.split("/")
    blind = f"{hostname}/{machine}/-/{namespace}"
    monkeypatch.setattr(lease, "host_identity", lambda: blind)
    assert not lease.owner_is_dead(f"{blind}:{rest}")
