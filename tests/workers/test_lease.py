"""Owner identities: a dead process is told apart from a live one, a reused pid from its
first owner, and another host's owner is never judged here."""

import os
import subprocess
import sys

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
