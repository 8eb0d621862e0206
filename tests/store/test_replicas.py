"""Read replicas (store/replicas.py): the lag measured against the primary's WAL position,
which server a read goes to, and what happens when either fails. The units use stand-ins;
the rest runs on a real streaming replica cloned from an embedded primary with
pg_basebackup (tests/support/replica.py), paused and resumed with pg_wal_replay_pause."""

import time

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from store.db import EMBEDDED_SUPERUSER, Database
from store.errors import Conflict, NotFound
from store.registry import get_model
from store.replicas import Reads, Replica, holds_since, lsn
from store.search import search
from tests.store.sets import ready_set, write_latents
from tests.support import store_untrained_model, wait

MODEL = {"input_shape": [4], "latent_dim": 2, "hidden": [8]}
N_ITEMS = 64


def test_a_wal_position_reads_as_one_ordered_number():
    assert lsn("16/B374D848") == 0x16_B374D848
    assert lsn("0/0") == 0
    assert lsn("1/0") > lsn("0/FFFFFFFF")
    with pytest.raises(ValueError, match="WAL position"):
        lsn("16-B374")


def test_a_replica_holds_what_the_primary_had_written_at_the_newest_position_it_passed():
    samples = [(10.0, 100), (11.0, 200), (12.0, 300)]  # (time, primary position)
    assert holds_since(300, samples) == 12.0
    assert holds_since(250, samples) == 11.0
    assert holds_since(200, samples) == 11.0
    assert holds_since(199, samples) == 10.0
    assert holds_since(50, samples) is None  # older than every sample kept


class Server:
    """A stand-in for a Database whose checks answer `row` (or raise `error`)."""

    def __init__(self, name, row=None):
        self.name, self.row, self.error = name, row, None
        self.engine = self

    def connect(self):
        return self

    def __enter__(self):
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, statement):
        return self

    def one(self):
        return self.row


CLUSTER = 7001


class Clock:
    def __init__(self, monkeypatch):
        self.now = 1000.0
        monkeypatch.setattr("store.replicas.time.monotonic", lambda: self.now)


def measured(monkeypatch, *replicas, max_lag_s=5.0, check_s=1.0):
    """Reads over stand-ins: the primary at position 0/100 of cluster CLUSTER, and
    replicas answering (standby, replayed position, system identifier)."""
    primary = Server("primary", ("0/100", CLUSTER))
    reads = Reads(primary, [Replica(Server(n, row), n) for n, row in replicas],
                  max_lag_s=max_lag_s, check_s=check_s, probe=primary)
    return reads, primary, Clock(monkeypatch)


def test_a_replica_whose_replay_stopped_shows_its_whole_lag_not_the_window(monkeypatch):
    reads, primary, clock = measured(monkeypatch, ("r", (True, "0/100", CLUSTER)))
    reads.check()
    assert reads.replicas[0].lag_s == 0.0 and reads.choose() is reads.replicas[0]
    for step in range(1, 101):  # the primary writes every second; the replica stops
        clock.now += 1.0
        primary.row = (f"0/{0x100 + step:X}", CLUSTER)
        reads.check()
    assert len(reads._samples) <= 10  # the window kept is short
    assert reads.replicas[0].lag_s == pytest.approx(100.0)  # the lag is not
    assert reads.choose() is None and reads.status()[0]["used"] is False


def test_at_first_sight_a_replica_behind_the_primary_is_not_taken_as_caught_up(monkeypatch):
    reads, _, clock = measured(monkeypatch, ("r", (True, "0/50", CLUSTER)))
    reads.check()
    assert reads.replicas[0].lag_s == float("inf") and reads.choose() is None
    clock.now += 1.0
    reads.replicas[0].db.row = (True, "0/100", CLUSTER)  # it catches up with the sample
    reads.check()
    assert reads.replicas[0].lag_s == 0.0 and reads.choose() is reads.replicas[0]


def test_a_promoted_server_or_another_clusters_standby_is_never_used(monkeypatch):
    reads, _, _ = measured(monkeypatch, ("promoted", (False, None, CLUSTER)),
                           ("stranger", (True, "0/900", 9999)),
                           ("ours", (True, "0/100", CLUSTER)))
    reads.check()
    promoted, stranger, _ = reads.replicas
    assert not promoted.up and "not in recovery" in promoted.error
    assert not stranger.up and "another cluster" in stranger.error
    assert {reads.run(lambda db: db.name) for _ in range(4)} == {"ours"}


def test_with_the_primary_down_lags_stand_as_measured_and_the_bound_still_holds(monkeypatch):
    from sqlalchemy.exc import OperationalError

    reads, primary, clock = measured(monkeypatch, ("fresh", (True, "0/100", CLUSTER)),
                                     ("stale", (True, "0/100", CLUSTER)))
    reads.check()
    for step in range(1, 11):  # "stale" stops replaying; "fresh" keeps up
        clock.now += 1.0
        primary.row = (f"0/{0x100 + step:X}", CLUSTER)
        reads.replicas[0].db.row = (True, f"0/{0x100 + step:X}", CLUSTER)
        reads.check()
    primary.error = OperationalError("SELECT", {}, Exception("connection refused"))
    clock.now += 600.0  # ten minutes of outage: nothing is written meanwhile
    reads.check()
    assert reads.primary_up is False
    assert [r.lag_s for r in reads.replicas] == [0.0, pytest.approx(10.0)]
    assert {reads.run(lambda db: db.name) for _ in range(3)} == {"fresh"}


class Stand:
    """A stand-in Database: only identity matters to the router."""

    def __init__(self, name):
        self.name = name


def router(*replicas, primary_up=True, max_lag_s=5.0):
    reads = Reads(Stand("primary"), [Replica(Stand(n), n, None, up, None, lag)
                                     for n, up, lag in replicas], max_lag_s=max_lag_s)
    reads.primary_up = primary_up
    return reads


def test_reads_go_round_robin_to_replicas_within_the_bound_else_to_the_primary():
    reads = router(("a", True, 0.1), ("b", True, 9.0), ("c", False, 0.0), ("d", True, None))
    assert {reads.run(lambda db: db.name) for _ in range(4)} == {"a"}  # b lags, c down, d new
    reads = router(("a", True, 0.1), ("b", True, 4.9))
    assert [reads.run(lambda db: db.name) for _ in range(4)] == ["a", "b", "a", "b"]
    assert reads.served == {"primary": 0, "replica": 4}
    reads = router(("b", True, 9.0))
    assert reads.run(lambda db: db.name) == "primary" and reads.served["primary"] == 1


def test_a_replica_that_has_not_replayed_the_answer_hands_the_read_to_the_primary():
    for missing in (NotFound("embedding set 7 does not exist"), Conflict("set 7 is writing")):
        reads = router(("a", True, 0.0))

        def read(db, missing=missing):
            if db.name == "a":
                raise missing
            return db.name

        assert reads.run(read) == "primary"
        reads.primary_up = False  # then the replica's answer is the answer
        with pytest.raises(type(missing)):
            reads.run(read)


def test_a_replica_that_fails_is_skipped_until_its_next_check_and_a_busy_pool_is_not_down():
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    reads = router(("a", True, 0.0))

    def read(db):
        if db.name == "a":
            raise OperationalError("SELECT", {}, Exception("server closed the connection"))
        return db.name

    assert reads.run(read) == "primary"
    assert reads.replicas[0].up is False and reads.choose() is None
    busy = router(("a", True, 0.0))

    def crowded(db):
        if db.name == "a":
            raise PoolTimeout("QueuePool limit reached")
        return db.name

    assert busy.run(crowded) == "primary" and busy.replicas[0].up is True
    with pytest.raises(ValueError):  # a bug is not an outage: it is raised, not hidden
        router(("a", True, 0.0)).run(lambda db: int("x"))


def test_fresh_reads_use_a_replica_only_while_the_primary_is_down_and_within_the_bound():
    down = OperationalError("SELECT", {}, Exception("connection refused"))

    def on_primary(db, x):
        if db.name == "primary" and db.down:
            raise down
        return ("primary", x)

    def on_replica(db, x):
        return (db.name, x)

    reads = router(("near", True, 1.0), ("far", True, 60.0))
    reads.primary.down = False
    assert reads.fresh(on_primary, on_replica, 1) == (("primary", 1), "primary")
    reads.primary.down = True  # this call's connection fails: the replica within the bound
    assert reads.fresh(on_primary, on_replica, 2) == (("near", 2), "replica")
    reads.replicas[0].lag_s = 30.0  # none within the bound: the primary's error
    with pytest.raises(OperationalError):
        reads.fresh(on_primary, on_replica, 3)
    with pytest.raises(ValueError):  # not an outage: no replica is asked
        reads.fresh(lambda db, x: int("x"), on_replica, 4)


# --- on a real streaming replica ---------------------------------------------------------

@pytest.fixture(scope="module")
def replica_su(pair):
    """The replica as its superuser (to pause and resume its replay)."""
    database = Database(pair.replica_url_of(EMBEDDED_SUPERUSER))
    yield database
    database.dispose()


def replay(database, action):
    with database.engine.connect() as conn:
        conn.execute(text(f"SELECT pg_wal_replay_{action}()"))
        conn.commit()


def a_set(db, settings, tmp_path, seed):
    tmp_path.mkdir(parents=True, exist_ok=True)
    model_id = store_untrained_model(db, settings, str(tmp_path), MODEL)[0]
    mu = np.random.default_rng(seed).normal(size=(N_ITEMS, 2)).astype(np.float32)

    def write(set_id):
        zeros = np.zeros(N_ITEMS)
        write_latents(db, set_id, 0, mu, mu, zeros, zeros, zeros)

    return ready_set(db, model_id, get_model(db, model_id).dataset_id, write), mu


def nearest_by_brute_force(mu, query, k):
    return list(np.argsort(((mu - query) ** 2).sum(1), kind="stable")[:k])


def caught_up(reads):
    reads.check()
    return reads.replicas[0].up and reads.replicas[0].lag_s == 0.0


@pytest.mark.slow
def test_a_caught_up_replica_answers_searches_with_the_primary_s_rows(
        pair, primary, settings, tmp_path):
    set_id, mu = a_set(primary, settings, tmp_path, 1)
    reads = Reads.of(primary, [pair.replica_url], max_lag_s=2.0)
    try:
        wait("the replica to replay the set", lambda: caught_up(reads), timeout=30)
        query = np.array([0.3, -0.2])
        answer = reads.run(search, settings, set_id, vector=query, k=5)
        assert reads.served == {"primary": 0, "replica": 1}
        assert [h.index for h in answer.hits] == nearest_by_brute_force(mu, query, 5)
        distances = np.sqrt(((mu[[h.index for h in answer.hits]] - query) ** 2).sum(1))
        assert np.allclose([h.distance for h in answer.hits], distances, atol=1e-5)
        with Database(pair.replica_url).engine.connect() as conn:  # it is a standby
            assert conn.execute(text("SELECT pg_is_in_recovery()")).scalar() is True
    finally:
        reads.close()


@pytest.mark.slow
def test_a_replica_whose_replay_stops_is_skipped_once_it_lags_past_the_bound(
        pair, primary, replica_su, settings, tmp_path):
    first, mu = a_set(primary, settings, tmp_path / "a", 2)
    reads = Reads.of(primary, [pair.replica_url], max_lag_s=1.0, check_s=0.1)
    reads.start()
    try:
        wait("the replica to catch up", lambda: reads.replicas[0].lag_s == 0.0, timeout=30)
        replay(replica_su, "pause")
        paused = time.monotonic()
        later, later_mu = a_set(primary, settings, tmp_path / "b", 3)  # written past the pause
        wait("the replica to be skipped", lambda: reads.choose() is None, timeout=30)
        # not before it lagged past the bound (measured once a check: up to check_s early)
        assert time.monotonic() - paused >= 1.0 - reads.check_s
        assert reads.replicas[0].up and reads.replicas[0].lag_s > 1.0
        # the primary answers both sets meanwhile
        query = np.array([-0.1, 0.4])
        for set_id, rows in ((first, mu), (later, later_mu)):
            hits = reads.run(search, settings, set_id, vector=query, k=3).hits
            assert [h.index for h in hits] == nearest_by_brute_force(rows, query, 3)
        assert reads.served == {"primary": 2, "replica": 0}
        replay(replica_su, "resume")
        wait("the replica to be used again", lambda: reads.choose() is not None, timeout=30)
        hits = reads.run(search, settings, later, vector=query, k=3).hits
        assert [h.index for h in hits] == nearest_by_brute_force(later_mu, query, 3)
        assert reads.served["replica"] == 1
    finally:
        replay(replica_su, "resume")
        reads.close()


@pytest.mark.slow
def test_a_set_the_replica_has_not_replayed_is_answered_by_the_primary(
        pair, primary, replica_su, settings, tmp_path):
    reads = Reads.of(primary, [pair.replica_url], max_lag_s=600.0)  # the bound keeps it
    try:
        wait("the replica to catch up", lambda: caught_up(reads), timeout=30)
        replay(replica_su, "pause")
        set_id, mu = a_set(primary, settings, tmp_path, 4)
        reads.check()
        assert reads.choose() is not None  # within its (wide) bound, yet without the set
        query = np.array([0.0, 0.0])
        hits = reads.run(search, settings, set_id, vector=query, k=4).hits
        assert [h.index for h in hits] == nearest_by_brute_force(mu, query, 4)
        assert reads.served == {"primary": 1, "replica": 0}
    finally:
        replay(replica_su, "resume")
        reads.close()
