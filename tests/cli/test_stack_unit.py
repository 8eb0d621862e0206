"""Units of the `up` supervisor."""

import socket
import sys

from service.stack import Child, port_free


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
