"""Aliases and deletion on real PostgreSQL: atomic moves under concurrency, history, the
409s that protect aliased or busy objects, and everything a delete must take with it
(rows, per-set HNSW indexes, artifact files)."""

import itertools
import threading

import numpy as np
import pytest
from sqlalchemy import text

from store.aliases import delete_alias, get_alias, list_aliases, resolve, set_alias
from store.deletion import delete_set
from store.errors import Conflict, InvalidInput, NotFound
from store.indexes import build_index, index_name
from store.partitions import partition_name
from store.registry import delete_model, get_model
from store.settings import open_artifacts
from store.tables import Job
from tests.store.sets import count_latents, ready_set, write_latents
from tests.support import store_untrained_model

MODEL = {"input_shape": [4], "latent_dim": 2, "hidden": [8]}
N_ITEMS = 64  # the items of store_untrained_model's dataset: a set holds them all


@pytest.fixture
def two_models(db, settings, tmp_path):
    ids = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        ids.append(store_untrained_model(db, settings, str(tmp_path / name), MODEL)[0])
    return ids


def a_ready_set(db, model_id):
    model = get_model(db, model_id)
    n, dim = N_ITEMS, MODEL["latent_dim"]

    def write(set_id):
        mu = np.random.default_rng(set_id).normal(size=(n, dim)).astype(np.float32)
        zeros = np.zeros(n)
        write_latents(db, set_id, 0, mu, mu, zeros, zeros, zeros)

    return ready_set(db, model_id, model.dataset_id, write)


def indexes(db):
    """The indexes of `latents` and of its partitions."""
    with db.engine.connect() as conn:
        return set(conn.execute(text(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'latents' OR tablename IN "
            "(SELECT inhrelid::regclass::text FROM pg_inherits "
            "WHERE inhparent = 'latents'::regclass)")).scalars())


def partition_exists(db, set_id):
    with db.engine.connect() as conn:
        return conn.execute(text("SELECT to_regclass(:n) IS NOT NULL"),
                            {"n": partition_name(set_id)}).scalar()


def test_an_alias_is_created_moved_and_resolved_with_its_history(db, two_models, request):
    a, b = two_models
    name = f"prod-{request.node.name[-8:].lower().replace('_', '-')}"
    view, action = set_alias(db, name, "model", a, key_id=None)
    assert action == "created" and view.target_id == a and view.kind == "model"
    assert resolve(db, f"@{name}", "model") == a
    assert set_alias(db, name, "model", a)[1] == "unchanged"
    view, action = set_alias(db, name, "model", b)
    assert action == "moved" and resolve(db, f"@{name}", "model") == b
    assert [(e["action"], e["target_id"], e["previous_id"]) for e in view.history] == [
        ("created", a, None), ("moved", b, a)]
    assert name in [v.name for v in list_aliases(db, "model")]
    assert name not in [v.name for v in list_aliases(db, "embedding_set")]
    with pytest.raises(NotFound, match="names model .* not an embedding set"):
        resolve(db, f"@{name}", "embedding_set")
    set_id = a_ready_set(db, a)
    with pytest.raises(Conflict, match=f"alias '{name}' names model {b}"):
        set_alias(db, name, "embedding_set", set_id)
    delete_alias(db, name)
    with pytest.raises(NotFound):
        resolve(db, f"@{name}", "model")
    # the name can be used again, and its history goes on
    view, action = set_alias(db, name, "embedding_set", set_id)
    assert action == "created" and resolve(db, f"@{name}", "embedding_set") == set_id
    assert [e["action"] for e in get_alias(db, name).history] == [
        "created", "moved", "deleted", "created"]


@pytest.mark.parametrize(("name", "kind", "target", "error"), [
    ("Prod", "model", 1, InvalidInput), ("1prod", "model", 1, InvalidInput),
    ("a" * 64, "model", 1, InvalidInput), ("ok", "dataset", 1, InvalidInput),
    ("ok", "model", 2**62, NotFound), ("ok", "embedding_set", 2**62, NotFound),
])
def test_bad_aliases_are_refused_and_write_nothing(db, name, kind, target, error):
    before = len(list_aliases(db))
    with pytest.raises(error):
        set_alias(db, name, kind, target)
    assert len(list_aliases(db)) == before


def test_an_alias_names_only_a_ready_object(db, two_models):
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE models SET status = 'training' WHERE id = :m"),
                     {"m": two_models[0]})
    with pytest.raises(Conflict, match="training, not ready"):
        set_alias(db, "staging-x", "model", two_models[0])


def test_concurrent_moves_leave_one_target_and_a_history_of_every_move(db, two_models):
    a, b = two_models
    set_alias(db, "race", "model", a)
    actions, errors = [], []

    def move(target):
        try:
            actions.append(set_alias(db, "race", "model", target)[1])
        except Exception as exc:  # collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=move, args=(a if i % 2 else b,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    view = get_alias(db, "race")
    moves = [e for e in view.history if e["action"] == "moved"]
    assert len(moves) == actions.count("moved")
    # each move starts where the previous one left: no lost update
    chain = [e for e in view.history if e["action"] in ("created", "moved")]
    for before, after in itertools.pairwise(chain):
        assert after["previous_id"] == before["target_id"]
    assert chain[-1]["target_id"] == view.target_id
    delete_alias(db, "race")


def test_deleting_a_model_takes_its_rows_indexes_and_files(db, settings, two_models):
    a, _ = two_models
    small = settings.model_copy(update={"exact_search_below": 10})
    set_id = a_ready_set(db, a)
    assert build_index(db, set_id, small).status == "ready"
    assert index_name(set_id) in indexes(db)
    artifacts = open_artifacts(settings)
    assert artifacts.exists(f"models/{a}/attempt-1/decoder.onnx")

    set_alias(db, "keep-a", "embedding_set", set_id)
    with pytest.raises(Conflict, match="alias 'keep-a'"):
        delete_model(db, artifacts, a)
    delete_alias(db, "keep-a")
    with db.session() as s:
        job = Job(kind="embed", status="queued", params={}, model_id=a)
        s.add(job)
        s.flush()
        job_id = job.id
    with pytest.raises(Conflict, match=f"queued or running job {job_id}"):
        delete_model(db, artifacts, a)
    assert count_latents(db, set_id) == N_ITEMS  # refused: nothing went
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'cancelled' WHERE id = :j"), {"j": job_id})

    assert delete_model(db, artifacts, a) == [set_id]
    with pytest.raises(NotFound):
        get_model(db, a)
    assert count_latents(db, set_id) == 0
    assert index_name(set_id) not in indexes(db) and not partition_exists(db, set_id)
    assert not artifacts.exists(f"models/{a}")
    with db.engine.connect() as conn:  # the job's history stays, without its model
        assert conn.execute(text("SELECT model_id FROM jobs WHERE id = :j"),
                            {"j": job_id}).scalar() is None
    with pytest.raises(NotFound):
        delete_model(db, artifacts, a)


def test_deleting_a_set_drops_its_index_and_keeps_the_model(db, settings, two_models):
    _, b = two_models
    small = settings.model_copy(update={"exact_search_below": 10})
    set_id, other = a_ready_set(db, b), a_ready_set(db, b)
    build_index(db, set_id, small)
    build_index(db, other, small)
    # a worker builds the index (a live lease): the delete waits for it
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE embedding_sets SET index_status = 'building', "
                          "index_owner = 'builder', "
                          "index_lease_expires_at = now() + interval '1 minute' WHERE id = :s"),
                     {"s": set_id})
    with pytest.raises(Conflict, match="being built"):
        delete_set(db, set_id)
    with pytest.raises(Conflict, match="is building its index"):
        delete_model(db, open_artifacts(settings), b)
    # its lease ran out (the worker is gone): nothing holds the set any more
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE embedding_sets SET index_lease_expires_at = now() "
                          "- interval '1 second' WHERE id = :s"), {"s": set_id})
    delete_set(db, set_id)
    assert count_latents(db, set_id) == 0 and index_name(set_id) not in indexes(db)
    assert not partition_exists(db, set_id) and partition_exists(db, other)
    assert count_latents(db, other) == N_ITEMS and index_name(other) in indexes(db)
    assert get_model(db, b).status == "ready"
