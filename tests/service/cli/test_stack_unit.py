"""Units of the `up` supervisor."""

import socket
import subprocess
import sys

from service.cli.parts import Child
from service.cli.ports import port_free


def test_a_child_reads_only_its_own_run_of_an_appended_log(tmp_path):
    log = tmp_path / "worker.log"
    log.write_text("earlier run\nworker ready.\n")
    child = Child("worker", [sys.executable, "-c", "print('starting')"], {}, log)
    child.start()
    child.reap(30)
    assert child.tail() == "starting"  # an earlier run's "ready." does not count
    assert log.read_text().startswith("earlier run\n")


def test_reap_kills_what_ignores_sigterm(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "print('up', flush=True); time.sleep(60)"
    child = Child("stubborn", [sys.executable, "-c", code], {}, tmp_path / "log")
    child.start()
    while "up" not in child.tail():
        pass
    child.terminate()
    child.reap(0.5)
    assert not child.running() and child.proc.returncode == -9


def test_port_free():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not port_free("127.0.0.1", s.getsockname()[1])
    assert port_free("127.0.0.1", 0)


def _part(tmp_path, code="import time; time.sleep(60)", dead_after=0.0):
    from service.cli.parts import Part

    child = Child("sleeper", [sys.executable, "-c", code], {}, tmp_path / "log")
    return child, Part("sleeper", child.start, lambda: child.pid if child.running() else 0,
                       lambda: "running", lambda: child.reap(0.0), dead_after=dead_after)


def test_a_dead_part_is_restarted_with_a_doubling_back_off(tmp_path, monkeypatch):
    from service.cli import parts

    clock = [1000.0]
    monkeypatch.setattr(parts.time, "monotonic", lambda: clock[0])
    said = []
    child, part = _part(tmp_path, "pass")  # exits at once, every time
    part.start()
    child.proc.wait()
    delays = []
    for _ in range(3):
        part.watch(said.append)  # notices the death, schedules the restart
        delays.append(part._next_start - clock[0])
        clock[0] = part._next_start
        part.watch(said.append)  # restarts it
        child.proc.wait()
    assert delays == [1.0, 2.0, 4.0] and part.restarts == 3
    assert said[:2] == ["the sleeper died; restarting it in 1 s",
                        "restarting the sleeper (restart 1)"]
    part.check()
    assert part.health == "down"


def test_a_death_must_last_before_a_restart_and_a_live_part_is_left_alone(tmp_path,
                                                                          monkeypatch):
    from service.cli import parts

    clock = [0.0]
    monkeypatch.setattr(parts.time, "monotonic", lambda: clock[0])
    child, part = _part(tmp_path, dead_after=3.0)
    part.start()
    part.watch(print)
    assert part._next_start is None and part.restarts == 0
    part.check()
    assert part.health == "running"
    child.reap(0.0)
    part.watch(print)  # dead for 0 s: maybe a `pg_ctl restart`, not a crash
    clock[0] = 2.0
    part.watch(print)
    assert part._next_start is None
    clock[0] = 3.5
    part.watch(print)
    assert part._next_start == 3.5 + 1.0
    clock[0] = 5.0
    part.watch(print)
    assert part.restarts == 1 and part.alive()
    part.stop_fn()


def test_a_part_that_ran_a_while_is_restarted_quickly_again(tmp_path, monkeypatch):
    from service.cli import parts

    clock = [0.0]
    monkeypatch.setattr(parts.time, "monotonic", lambda: clock[0])
    child, part = _part(tmp_path)
    part._backoff = parts.BACKOFF_MAX  # after a crash loop
    part.start()
    clock[0] = parts.STABLE_AFTER
    part.watch(print)  # up long enough: it started well
    child.reap(0.0)
    part.watch(print)
    assert part._next_start == clock[0] + parts.BACKOFF_FIRST
    clock[0] += 1.0
    part.watch(print)
    assert part.restarts == 1 and part.alive()
    part.stop_fn()


def test_upgrade_db_is_refused_while_up_holds_the_folder_even_without_proc(tmp_path,
                                                                           monkeypatch):
    """`upgrade-db` takes `up`'s lock for the upgrade: refused while a stack holds it,
    also off /proc, where no stack.json can be verified (read_stack says None)."""
    import fcntl
    import json
    import os

    from typer.testing import CliRunner

    from service.cli import running
    from service.cli.main import app
    from store.settings import get_settings

    monkeypatch.setattr(running, "PROC", tmp_path / "no-proc")
    monkeypatch.setenv("LATENTBANK_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("LATENTBANK_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    (tmp_path / "stack.json").write_text(json.dumps({"url": "http://x", "pid": os.getpid()}))
    (tmp_path / "stack.json").chmod(0o600)
    held = open(tmp_path / "up.lock", "a+")  # noqa: SIM115 (as `up` holds it)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert running.read_stack(tmp_path) is None  # unverifiable: not trusted
        out = CliRunner().invoke(app, ["upgrade-db"])
        assert out.exit_code == 2
        assert out.output.strip() == f"error: a stack runs from {tmp_path.resolve()}: " \
                                     "stop it first"
    finally:
        held.close()
        get_settings.cache_clear()
    out = CliRunner().invoke(app, ["upgrade-db"])  # nothing to upgrade, but not refused
    assert "stop it first" not in out.output
    get_settings.cache_clear()


def test_off_proc_status_and_demo_say_why_they_see_no_stack(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from service.cli import running
    from service.cli.main import app
    from store.settings import get_settings

    monkeypatch.setattr(running, "PROC", tmp_path / "no-proc")
    monkeypatch.setenv("LATENTBANK_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(app, ["status"])
        assert out.exit_code == 3
        assert "this host has no /proc" in out.output and "LATENTBANK_URL" in out.output
        started = []
        monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
        out = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "out")])
        assert out.exit_code == 1 and started == []
        assert "latentbank demo --url URL" in str(out.exception) + out.output
    finally:
        get_settings.cache_clear()
