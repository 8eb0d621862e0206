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
from store.errors import Conflict, DatabaseUnavailable, NotFound
from store.registry import get_model
from store.replicas import Reads, Replica, lag_seconds, lsn
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


def test_the_lag_is_bounded_by_the_newest_primary_position_the_replica_holds():
    samples = [(10.0, 100), (11.0, 200), (12.0, 300)]  # (time, primary position)
    assert lag_seconds(300, samples, now=12.5) == 0.0  # everything replayed
    assert lag_seconds(301, samples, now=12.5) == 0.0
    assert lag_seconds(250, samples, now=12.5) == 1.5  # holds what was written by t=11
    assert lag_seconds(200, samples, now=12.5) == 1.5
    assert lag_seconds(199, samples, now=12.5) == 2.5  # only what was written by t=10
    assert lag_seconds(50, samples, now=12.5) == 2.5  # older than every sample: at least
    with pytest.raises(ValueError):
        lag_seconds(1, [], now=1.0)


class Stand:
    """A stand-in Database: only identity matters to the router."""

    def __init__(self, name):
        self.name = name


def router(*replicas, primary_up=True, max_lag_s=5.0):
    reads = Reads(Stand("primary"), [Replica(Stand(n), n, up, lag) for n, up, lag in replicas],
                  max_lag_s=max_lag_s)
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


def test_with_the_primary_down_the_least_behind_replica_that_answers_serves():
    reads = router(("a", True, 30.0), ("b", True, 12.0), ("c", False, 0.0), ("d", True, None),
                   primary_up=False)
    assert {reads.run(lambda db: db.name) for _ in range(3)} == {"b"}
    assert router(("c", False, 0.0), primary_up=False).choose() is None


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


def test_a_replica_that_fails_is_skipped_until_its_next_check():
    reads = router(("a", True, 0.0))

    def read(db):
        if db.name == "a":
            raise OperationalError("SELECT", {}, Exception("server closed the connection"))
        return db.name

    assert reads.run(read) == "primary"
    assert reads.replicas[0].up is False and reads.choose() is None
    with pytest.raises(ValueError):  # a bug is not an outage: it is raised, not hidden
        router(("a", True, 0.0)).run(lambda db: int("x"))
    down = router(("a", False, 0.0), primary_up=False)
    with pytest.raises(DatabaseUnavailable):
        down.on_replica(lambda db: db.name)


# --- on a real streaming replica ---------------------------------------------------------

@pytest.fixture(scope="module")
def primary(pair):
    database = Database(pair.primary_url)
    yield database
    database.dispose()


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
        assert time.monotonic() - paused >= 1.0  # not before it lagged past the bound
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
