"""ingest.staging on its own: a unit is staged whole or not at all, a killed attempt's
half-written unit is dropped by the next, and the staged chunks come back exactly."""

import os
import subprocess
import sys

import numpy as np
import pytest

from ingest.plan import Location, Plan, Report, Unit
from ingest.staging import Staging, staged_jobs, sweep_staging
from store.datasets import Chunk
from store.errors import TooLarge


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def chunks_of(arrays, prefix):
    start = 0
    for values in arrays:
        yield Chunk(values, [f"{prefix}{start + i}" for i in range(len(values))])
        start += len(values)


def test_units_are_staged_whole_and_come_back_exactly(tmp_path):
    rng = np.random.default_rng(2405)
    first = [rng.integers(0, 256, (3, 1, 2, 2), dtype=np.uint8) for _ in range(2)]
    second = [rng.integers(0, 256, (4, 1, 2, 2), dtype=np.uint8)]
    staging = Staging(tmp_path, 7)
    assert staging.prepare("plan-a") == {}
    units = [Unit(0, "u0", 100), Unit(1, "u1", 50), Unit(2, "u2", 10)]
    report = Report(read=6, failed=1, failures=[{"key": "bad.png", "reason": "damaged"}])
    staging.write_unit(units[0], chunks_of(first, "a"), report)
    staging.write_unit(units[1], chunks_of(second, "b"), Report(read=4))

    def killed():
        yield Chunk(np.zeros((2, 1, 2, 2), np.uint8))
        raise RuntimeError("the reader broke mid-unit")

    with pytest.raises(RuntimeError):
        staging.write_unit(units[2], killed(), Report())
    os.mkdir(staging.path / f".unit-000002-{dead_pid()}-deadbeef")  # what a kill -9 leaves
    # a stale attempt of the same job, alive on this host, still writing: left alone
    os.mkdir(staging.path / f".unit-000002-{os.getpid()}-cafe0000")
    done = staging.prepare("plan-a")
    assert sorted(done) == [0, 1] and sorted(os.listdir(staging.path)) == [
        f".unit-000002-{os.getpid()}-cafe0000", "plan.json", "unit-000000", "unit-000001"]
    os.rmdir(staging.path / f".unit-000002-{os.getpid()}-cafe0000")
    assert (done[0]["items"], done[0]["chunks"], done[0]["bytes"], done[0]["f32_bytes"]) == (
        6, 2, 100, 4 * 6 * 4)
    assert done[0]["report"] == report.to_dict() and done[0]["item_shape"] == [1, 2, 2]
    got = list(staging.chunks([0, 1]))
    for chunk, want in zip(got, first + second, strict=True):
        assert chunk.values.dtype == np.uint8
        np.testing.assert_array_equal(chunk.values, want)
    assert [k for c in got for k in c.keys] == [f"a{i}" for i in range(6)] + [
        f"b{i}" for i in range(4)]
    plan = Plan("images", Location(None, "x", "x"), units[:2], 150, pixels=True)
    source = staging.source(plan, done)
    assert (source.n_items, source.item_shape, source.dtype, source.pixels) == (
        10, (1, 2, 2), "uint8", True)
    assert source.has_keys and not source.has_labels
    staging.remove()
    assert not staging.path.exists()


def test_units_staged_under_another_plan_are_dropped(tmp_path):
    """The source changed between attempts (a file added shifts every unit after it):
    nothing staged under the old plan is mixed into the new one."""
    staging = Staging(tmp_path, 9)
    staging.prepare("before")
    staging.write_unit(Unit(0, "u0", 1), chunks_of([np.ones((2, 3))], "a"), Report())
    assert sorted(staging.prepare("before")) == [0]
    assert staging.prepare("after") == {}
    assert sorted(os.listdir(staging.path)) == ["plan.json"]


def test_a_unit_staged_first_by_another_attempt_stands(tmp_path):
    """Two attempts of one job on one host (a stale one finishing its unit): the second
    rename finds the unit in place and takes its record; its own copy goes."""
    first, second = Staging(tmp_path, 10), Staging(tmp_path, 10)
    first.prepare("p")
    record = first.write_unit(Unit(0, "u0", 1), chunks_of([np.ones((2, 3))], "a"), Report())
    again = second.write_unit(Unit(0, "u0", 1), chunks_of([np.zeros((2, 3))], "a"), Report())
    assert again == record
    assert sorted(os.listdir(first.path)) == ["plan.json", "unit-000000"]
    np.testing.assert_array_equal(next(first.chunks([0])).values, np.ones((2, 3)))


def test_staging_stops_at_the_float32_bound(tmp_path):
    staging = Staging(tmp_path, 8, max_bytes=4 * 10)
    staging.prepare("p")
    with pytest.raises(TooLarge, match="max_inflated_bytes"):
        staging.write_unit(Unit(0, "u0", 1), chunks_of([np.zeros((3, 4))], "k"), Report())
    assert os.listdir(staging.path) == ["plan.json"]


def test_the_sweep_removes_only_ended_jobs_folders(tmp_path):
    for job in (1, 2, 3):
        Staging(tmp_path, job).prepare("p")
    (tmp_path / "other").mkdir()
    assert staged_jobs(tmp_path) == {1, 2, 3}
    removed = sweep_staging(tmp_path, live={2}, among={1, 2})  # job 3 started since
    assert [os.path.basename(p) for p in removed] == ["job-1"]
    assert sorted(os.listdir(tmp_path)) == ["job-2", "job-3", "other"]
    sweep_staging(tmp_path, live={2})
    assert sorted(os.listdir(tmp_path)) == ["job-2", "other"]
