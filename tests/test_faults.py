"""The fault-injection suite's fast subset: one trial of every scenario of
`bench/faults.py` against a real `latentbank up` (pool-child, worker, Redis, PostgreSQL
and API kills and stops, a shard's message lost by the broker, a cancel mid-way), each
followed by its invariants (the job ends as it should, no duplicated or missing rows,
resumed from a checkpoint, fenced files), and no process left once the stack is
stopped. `make faults` runs the full counts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.system, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parents[1]


def test_one_trial_of_every_fault_holds(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTBANK_")}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "faults.py"), "--trials", "1",
                          "--json", str(tmp_path / "trials.json")],
                         capture_output=True, text=True, timeout=1100, env=env, cwd=ROOT,
                         stdin=subprocess.DEVNULL)
    table = run.stdout[run.stdout.rfind("scenario"):]
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-3000:]
    assert "0 failed; processes left after stop: 0" in table, table
    import json

    trials = json.loads((tmp_path / "trials.json").read_text())
    assert len(trials) == 17 and all(t["held"] for t in trials)
