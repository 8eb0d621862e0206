"""One partition of `latents` per embedding set, on real PostgreSQL: made with the set,
holding only its rows; deleting the set drops it (nothing left to vacuum); a drop that a
long reader holds up is left and finished by the maintenance pass, while searches of
other sets go on."""

import threading
import time

import numpy as np
import pytest
from sqlalchemy import text

from store.deletion import delete_set
from store.embedding_sets import get_set
from store.partitions import drop_partitions, orphan_partitions, partition_name
from store.registry import get_model
from store.search import search
from tests.store.sets import count_latents, ready_set, write_latents
from tests.support import store_untrained_model

MODEL = {"input_shape": [4], "latent_dim": 2, "hidden": [8]}
N_ITEMS = 64


@pytest.fixture
def model_id(db, settings, tmp_path):
    return store_untrained_model(db, settings, str(tmp_path), MODEL)[0]


def a_set(db, model_id, seed):
    model = get_model(db, model_id)
    mu = np.random.default_rng(seed).normal(size=(N_ITEMS, 2)).astype(np.float32)

    def write(set_id):
        zeros = np.zeros(N_ITEMS)
        write_latents(db, set_id, 0, mu, mu, zeros, zeros, zeros)

    return ready_set(db, model_id, model.dataset_id, write), mu


def relation(db, name):
    with db.engine.connect() as conn:
        return conn.execute(text("SELECT to_regclass(:n)::text"), {"n": name}).scalar()


def test_each_set_is_a_partition_of_its_own_and_goes_with_the_set(db, model_id):
    (a, _), (b, _) = a_set(db, model_id, 1), a_set(db, model_id, 2)
    with db.engine.connect() as conn:
        for set_id in (a, b):  # only its own rows, in its own table
            rows = conn.execute(text(f"SELECT DISTINCT set_id, count(*) OVER () FROM "
                                     f"{partition_name(set_id)}")).all()
            assert rows == [(set_id, N_ITEMS)]
    delete_set(db, a)
    assert relation(db, partition_name(a)) is None and count_latents(db, a) == 0
    assert relation(db, partition_name(b)) == partition_name(b)
    assert count_latents(db, b) == N_ITEMS
    assert a not in orphan_partitions(db)


def gone(db, set_id):
    """Delete the set's row as delete_set does, leaving its partition to the caller."""
    with db.session() as s:
        s.execute(text("DELETE FROM embedding_sets WHERE id = :a"), {"a": set_id})


def test_drops_held_up_by_a_writer_are_left_and_finished_later(db, model_id, settings):
    """A shard of set b is being written (its transaction holds `latents` open): the
    detach of set a waits, is cut short and stays pending; the drop of set c, behind
    it, is left too instead of failing; searches of b go on; once the writer commits,
    the next drop finishes what is left."""
    (a, _), (b, mu_b), (c, _) = (a_set(db, model_id, s) for s in (3, 4, 6))
    writer = db.engine.connect()
    writer.begin()
    writer.execute(text(f"DELETE FROM latents WHERE set_id = {b} AND item_index >= 1000"))
    try:
        gone(db, a)
        started = time.perf_counter()
        assert drop_partitions(db, [a], wait_ms=300) == [a]
        gone(db, c)
        assert drop_partitions(db, [c], wait_ms=300) == [c]
        assert time.perf_counter() - started < 5
        # c is left pending (a's pending detach was finished on the way: its FINALIZE
        # waits only for old snapshots, and an idle writer holds none)
        assert c in orphan_partitions(db)
        done = []  # meanwhile searches of other sets go on, and answer exactly
        searcher = threading.Thread(target=lambda: done.append(
            search(db, settings, b, vector=mu_b[0], k=3)))
        searcher.start()
        searcher.join(timeout=10)
        assert done and done[0].hits[0].index == 0
    finally:
        writer.commit()
        writer.close()
    assert drop_partitions(db, orphan_partitions(db)) == []
    for set_id in (a, c):
        assert relation(db, partition_name(set_id)) is None
    assert get_set(db, b).n_items == N_ITEMS and count_latents(db, b) == N_ITEMS


def test_concurrent_deletes_all_end_dropped(db, model_id):
    """Deletes of several sets at once (PostgreSQL allows one pending detach at a time):
    none fails, and whatever one leaves the next drop finishes."""
    sets = [a_set(db, model_id, 10 + i)[0] for i in range(4)]
    errors = []

    def delete(set_id):
        try:
            delete_set(db, set_id)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=delete, args=(s,)) for s in sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    drop_partitions(db, orphan_partitions(db))
    for set_id in sets:
        assert relation(db, partition_name(set_id)) is None
        assert count_latents(db, set_id) == 0


def test_the_maintenance_pass_drops_partitions_whose_set_is_gone(migrated_database, settings,
                                                                  tmp_path):
    from store.db import Database
    from workers.maintenance import run_maintenance

    db = Database(migrated_database("orphans"))  # a database of its own: a whole pass
    model_id = store_untrained_model(db, settings, str(tmp_path), MODEL)[0]
    a, _ = a_set(db, model_id, 5)
    with db.session() as s:  # a process died between deleting the set and its partition
        s.execute(text("DELETE FROM embedding_sets WHERE id = :a"), {"a": a})
    assert a in orphan_partitions(db)

    class NoSender:
        def send_task(self, *args, **kwargs):
            raise AssertionError("nothing to send")

    try:
        run_maintenance(db, NoSender(), grace_seconds=3600)
        assert relation(db, partition_name(a)) is None and a not in orphan_partitions(db)
    finally:
        db.dispose()
