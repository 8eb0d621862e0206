"""Growing an embedding set on real PostgreSQL: an append's part, its idempotent shard
writes, its end (counted in, or removed with its rows), the checks made before anything
is written, and the set's HNSW index taking the inserted rows."""

import numpy as np
import pytest

from ingest.arrays import register_file
from store.embedding_sets import get_set
from store.errors import Conflict, InvalidInput
from store.indexes import _set_index, build_index
from store.jobs import claim, finish, get_job
from store.registry import get_model
from store.retrieval import export_pages, get_item
from store.search import search
from store.settings import open_artifacts
from store.submit import submit_embedding
from tests.store.sets import count_latents, ready_set, set_parts, write_latents
from tests.support import store_untrained_model

MODEL = {"input_shape": [4], "latent_dim": 2, "hidden": [8]}
N0 = 64  # the items of store_untrained_model's dataset


def dataset_of(db, settings, tmp_path, name, n, prefix):
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=np.random.default_rng(n).random((n, 4), dtype=np.float32),
             keys=np.array([f"{prefix}{i}" for i in range(n)]))
    return register_file(db, open_artifacts(settings), settings, f"{name}-{tmp_path.name}",
                         str(path)).dataset.id


@pytest.fixture
def world(db, settings, tmp_path):
    (tmp_path / "m").mkdir()
    model_id = store_untrained_model(db, settings, str(tmp_path / "m"), MODEL)[0]
    base = get_model(db, model_id).dataset_id
    mu = np.random.default_rng(0).normal(size=(N0, 2)).astype(np.float32)
    set_id = ready_set(db, model_id, base, lambda set_id: write_latents(
        db, set_id, 0, mu, mu, -np.ones(N0), -np.ones(N0), np.zeros(N0)))
    return {"model": model_id, "set": set_id,
            "b": dataset_of(db, settings, tmp_path, "b", 30, "b"),
            "c": dataset_of(db, settings, tmp_path, "c", 20, "c")}


def write_part(db, set_id, start, n, seed=1):
    mu = np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32) + 10
    write_latents(db, set_id, start, mu, mu, -2 * np.ones(n), -2 * np.ones(n), np.zeros(n))
    return mu


def test_an_append_writes_idempotently_and_counts_in_when_it_succeeds(db, world):
    set_id = world["set"]
    job, _ = submit_embedding(db, world["model"], world["b"], embedding_set_id=set_id)
    assert job.params["append"] == {"start": N0, "n_items": 30}
    assert [(p.start, p.n_items, p.status) for p in set_parts(db, set_id)] == [
        (0, N0, "ready"), (N0, 30, "writing")]
    claim(db, job.id, "w", 60)
    assert get_set(db, set_id).status == "ready"  # searchable all along
    assert get_job(db, job.id).items_total == 30
    for _ in range(2):  # a redelivered shard rewrites its rows: never twice
        mu = write_part(db, set_id, N0, 30)
    assert count_latents(db, set_id) == N0 + 30
    finish(db, job.id, "w", "succeeded", embedding_set={"stats": {"n_items": N0 + 30}})
    es = get_set(db, set_id)
    assert es.status == "ready" and es.n_items == N0 + 30
    assert [p.status for p in set_parts(db, set_id)] == ["ready", "ready"]
    item = get_item(db, set_id, "b7")
    assert item["index"] == N0 + 7
    np.testing.assert_array_equal(item["mu"], mu[7])
    keys = [r["key"] for page in export_pages(db, set_id) for r in page]
    assert keys == [str(i) for i in range(N0)] + [f"b{i}" for i in range(30)]


@pytest.mark.parametrize("ending", ["failed", "cancelled"])
def test_an_append_that_fails_leaves_the_set_as_it_was(db, world, ending):
    set_id = world["set"]
    job, _ = submit_embedding(db, world["model"], world["c"], embedding_set_id=set_id)
    claim(db, job.id, "w", 60)
    write_part(db, set_id, N0, 20)
    finish(db, job.id, "w", ending)
    es = get_set(db, set_id)
    assert es.status == "ready" and es.n_items == N0
    assert count_latents(db, set_id) == N0
    assert [p.dataset_id for p in set_parts(db, set_id)] == [get_model(db, world["model"])
                                                           .dataset_id]
    # and the dataset can be appended again
    assert submit_embedding(db, world["model"], world["c"], embedding_set_id=set_id)[0]


def test_appends_are_checked_before_anything_is_written(db, settings, tmp_path, world):
    set_id, model = world["set"], world["model"]
    clash = dataset_of(db, settings, tmp_path, "clash", 5, "")  # keys "0".."4": the set's
    with pytest.raises(Conflict, match="'0', '1', '2', '3', '4'"):
        submit_embedding(db, model, clash, embedding_set_id=set_id)
    base = get_model(db, model).dataset_id
    with pytest.raises(Conflict, match="in embedding set"):
        submit_embedding(db, model, base, embedding_set_id=set_id)
    with pytest.raises(InvalidInput, match="same"):
        submit_embedding(db, model, world["b"], 5, embedding_set_id=set_id)
    (tmp_path / "other").mkdir()
    other = store_untrained_model(db, settings, str(tmp_path / "other"), MODEL)[0]
    with pytest.raises(InvalidInput, match=f"made by model {model}"):
        submit_embedding(db, other, world["b"], embedding_set_id=set_id)
    first, _ = submit_embedding(db, model, world["b"], embedding_set_id=set_id)
    with pytest.raises(Conflict, match=f"taking an append already \\(job {first.id}\\)"):
        submit_embedding(db, model, world["c"], embedding_set_id=set_id)
    assert len(set_parts(db, set_id)) == 2 and count_latents(db, set_id) == N0


def test_the_sets_index_takes_the_appended_rows(db, settings, world):
    set_id = world["set"]
    small = settings.model_copy(update={"exact_search_below": 10})
    build_index(db, set_id, small)
    _set_index(db, set_id, "ready", 40)  # the index plan, whatever calibration chose
    job, _ = submit_embedding(db, world["model"], world["b"], embedding_set_id=set_id)
    claim(db, job.id, "w", 60)
    mu = write_part(db, set_id, N0, 30)
    finish(db, job.id, "w", "succeeded")
    for i in (0, 13, 29):
        res = search(db, small, set_id, vector=mu[i], k=3)
        assert res.plan.startswith("hnsw(")
        assert res.hits[0].key == f"b{i}" and res.hits[0].distance == pytest.approx(0, abs=1e-6)
