"""The contract under a fuzzer run from outside, as a user would run it: the schemathesis
CLI (every check, 100 examples per operation, all its phases: examples, coverage, fuzzing,
stateful) against a live `latentbank up`. It must find no server error, no undocumented
status, no Allow header that misses a method, and serialise every declared body.

Excluded, as everywhere: positive-data acceptance (a model config can be well-formed JSON
and still wrong for its dataset; the answer is a 422 that names it)."""

import os
import signal
import subprocess
import sys

import pytest

from tests.support import Up, cli_json, free_port

pytestmark = [pytest.mark.slow, pytest.mark.system, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A stack whose worker is paused (SIGSTOP) while the fuzzer runs: the jobs it submits
    are accepted and stored but do not run, and leave the two cores to the API."""
    root = tmp_path_factory.mktemp("fuzzed")
    up = Up(root / "data", free_port(), root / "up.log")
    cli_json(up.data_dir, "datasets", "add", "--builtin", "digits")  # something to find
    worker = cli_json(up.data_dir, "status")["parts"]["worker"]["pid"]
    os.killpg(worker, signal.SIGSTOP)
    try:
        yield up
    finally:
        os.killpg(worker, signal.SIGCONT)
        up.stop()


def test_schemathesis_run_from_outside_finds_nothing(live, tmp_path):
    command = [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run",
               f"{live.url}/openapi.json", "-H", f"Authorization: Bearer {live.key}",
               "-n", "100", "--checks", "all",
               "--exclude-checks", "positive_data_acceptance", "--seed", "1",
               "--report", "junit", "--report-dir", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=800,
                         stdin=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
    summary = run.stdout[run.stdout.rfind("SUMMARY"):]
    found = run.stdout[run.stdout.find("FAILURES"):run.stdout.rfind("SUMMARY")]
    assert run.returncode == 0, found[:12000] + summary + run.stderr[-2000:]
    assert "failures" not in summary.lower() and "errors:" not in summary.lower(), summary
    # the stack is still whole: the fuzzer's requests broke nothing
    status = cli_json(live.data_dir, "status")
    assert {p["health"] for p in status["parts"].values()} <= {"ok", "running"}, status
