"""The ingest job's progress and cancel flag inside one unit (workers.ingest._watched), a
unit: one streamed archive is one unit, so a cancel must not wait for its end."""

import numpy as np
import pytest

from ingest.plan import Report, Unit
from store.datasets import Chunk
from store.jobs import LeaseLost
from workers.ingest import IngestCancelled, _watched


class FakeLease:  # the two flags the heartbeat thread keeps
    def __init__(self):
        self.cancelled, self.lost = False, False

    def check(self):
        if self.lost:
            raise LeaseLost("gone")


def chunks(report, sizes, lease=None, cancel_after=None):
    for i, n in enumerate(sizes):
        report.bytes += 1000 * n  # what a reader counts of its source
        yield Chunk(np.zeros((n, 1, 2, 2), np.uint8))
        if cancel_after is not None and i == cancel_after:
            lease.cancelled = True


def test_progress_is_reported_per_chunk_in_items_and_capped_bytes():
    lease, report, seen = FakeLease(), Report(), []
    out = list(_watched(chunks(report, [3, 4, 5]), Unit(0, "u", 9_000), report, lease,
                        lambda n, b: seen.append((n, b))))
    assert [len(c.values) for c in out] == [3, 4, 5]
    # items so far; bytes as the reader counted them, never past the unit's own size
    assert seen == [(3, 3000), (7, 7000), (12, 9000)]


def test_a_cancel_stops_the_unit_at_the_next_chunk():
    lease, report = FakeLease(), Report()
    taken = []
    with pytest.raises(IngestCancelled):
        for chunk in _watched(chunks(report, [2, 2, 2, 2], lease, cancel_after=1),
                              Unit(0, "u", 1), report, lease, lambda n, b: None):
            taken.append(len(chunk.values))
    assert taken == [2, 2]


def test_a_lost_lease_stops_the_unit():
    lease, report = FakeLease(), Report()
    lease.lost = True
    with pytest.raises(LeaseLost):
        list(_watched(chunks(report, [1]), Unit(0, "u", 1), report, lease,
                      lambda n, b: None))
