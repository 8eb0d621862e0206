"""Sets that store their latents as halfvec (float16): values as numpy rounds them to
float16, two bytes a dimension on disk (pg_column_size against the closed form), float32
answers from every reader (items, export, the SQL view), searches exact and indexed equal
to a brute force over the stored values, and values a float16 cannot hold refused with
nothing written."""

import numpy as np
import pytest
from sqlalchemy import text

from store.embedding_sets import get_set
from store.errors import InvalidInput
from store.indexes import build_index
from store.registry import get_model
from store.retrieval import export_pages, get_item
from store.search import _knn_sql, search
from store.submit import submit_embedding
from tests.store.sets import count_latents, end_set, write_latents
from tests.support import store_untrained_model

MODEL = {"input_shape": [4], "latent_dim": 8, "hidden": [8]}
DIM, N = 8, 64


@pytest.fixture(scope="module")
def model_id(db, tmp_path_factory):
    from store.settings import Settings

    folder = tmp_path_factory.mktemp("halfvec")
    return store_untrained_model(db, Settings(data_dir=folder / "data"), str(folder), MODEL)[0]


def a_set(db, model_id, vector_type, mu, logvar=None):
    """A ready set of `vector_type` over the model's 64 items, written from `mu`."""
    from store.jobs import claim

    job, _ = submit_embedding(db, model_id, get_model(db, model_id).dataset_id,
                              vector_type=vector_type)
    claim(db, job.id, "w", 600)
    zeros = np.zeros(len(mu))
    write_latents(db, job.embedding_set_id, 0, mu, mu if logvar is None else logvar,
                  zeros, zeros, zeros)
    end_set(db, job.embedding_set_id, job.id, "w")
    return job.embedding_set_id


def on_disk(width, dim=DIM):
    """A stored (vector | halfvec) value's bytes: int16 dim, int16 unused, `width` bytes a
    value, behind PostgreSQL's varlena header (1 byte up to 126 bytes, else 4)."""
    payload = 4 + width * dim
    return payload + (1 if payload + 1 <= 127 else 4)


def codes(seed, n=N):
    return np.random.default_rng(seed).normal(scale=3, size=(n, DIM)).astype(np.float32)


def half(values):
    return np.asarray(values, np.float32).astype(np.float16).astype(np.float32)


def test_a_halfvec_set_stores_float16_and_answers_float32_everywhere(db, model_id):
    mu, logvar = codes(1), codes(2) - 5
    set_id = a_set(db, model_id, "halfvec", mu, logvar)
    assert not np.array_equal(half(mu), mu)  # the rounding shows: the test can tell
    with db.engine.connect() as conn:
        row = conn.execute(text(
            f"SELECT count(*) FILTER (WHERE mu IS NULL AND logvar IS NULL), "
            f"max(pg_column_size(mu_half)), max(pg_column_size(logvar_half)) "
            f"FROM latents WHERE set_id = {set_id}")).one()
        assert tuple(row) == (N, on_disk(2), on_disk(2))
        view = conn.execute(text(
            "SELECT mu::real[], logvar::real[] FROM lb_v1.latents WHERE set_id = :s "
            "ORDER BY item_index"), {"s": set_id}).all()
    # real[] arrives as text, each value's shortest float4 form: exact once read as float32
    np.testing.assert_array_equal(np.asarray([r[0] for r in view], np.float32), half(mu))
    np.testing.assert_array_equal(np.asarray([r[1] for r in view], np.float32), half(logvar))
    item = get_item(db, set_id, "3")
    assert item["mu"].dtype == np.float32
    np.testing.assert_array_equal(item["mu"], half(mu[3]))
    np.testing.assert_array_equal(item["logvar"], half(logvar[3]))
    exported = [r for page in export_pages(db, set_id, 20) for r in page]
    np.testing.assert_array_equal([r["mu"] for r in exported], half(mu))


def test_a_vector_set_keeps_float32_in_four_bytes_a_value(db, model_id):
    mu = codes(3)
    set_id = a_set(db, model_id, "vector", mu)
    with db.engine.connect() as conn:
        row = conn.execute(text(
            f"SELECT count(*) FILTER (WHERE mu_half IS NULL), max(pg_column_size(mu)) "
            f"FROM latents WHERE set_id = {set_id}")).one()
    assert tuple(row) == (N, on_disk(4))
    np.testing.assert_array_equal(get_item(db, set_id, "5")["mu"], mu[5])


def brute_force(stored, query, k):
    distances = np.sqrt(((stored.astype(np.float64) - query) ** 2).sum(1))
    order = np.argsort(distances, kind="stable")[:k]
    return list(order), distances[order]


def test_searches_of_a_halfvec_set_equal_a_brute_force_over_the_stored_values(
        db, model_id, settings):
    mu = codes(4, n=N)
    set_id = a_set(db, model_id, "halfvec", mu)
    stored = half(mu)
    for seed in range(5):
        query = np.random.default_rng(100 + seed).normal(scale=3, size=DIM)
        hits = search(db, settings, set_id, vector=query, k=10).hits
        want, distances = brute_force(stored, half(query), 10)
        assert [h.index for h in hits] == want
        np.testing.assert_allclose([h.distance for h in hits], distances, rtol=1e-5)
    by_key = search(db, settings, set_id, key="9", k=3).hits
    assert [h.index for h in by_key] == [i for i in brute_force(stored, stored[9], 4)[0]
                                         if i != 9][:3]


def test_the_index_of_a_halfvec_set_is_over_halfvec_and_its_answers_match(
        db, model_id, settings):
    mu = codes(5, n=N)
    set_id = a_set(db, model_id, "halfvec", mu)
    small = settings.model_copy(update={"exact_search_below": 10})
    build_index(db, set_id, small)
    with db.engine.connect() as conn:
        definition = conn.execute(text(
            "SELECT indexdef FROM pg_indexes WHERE tablename = :t AND indexdef LIKE '%hnsw%'"),
            {"t": f"latents_set_{set_id}"}).scalar()
        conn.execute(text(f"UPDATE embedding_sets SET index_status = 'ready', "
                          f"hnsw_ef_search = 40 WHERE id = {set_id}"))
        conn.commit()
    assert "halfvec_l2_ops" in definition and "halfvec(8)" in definition
    es = get_set(db, set_id)
    with db.engine.begin() as conn:  # the index serves the search's own SQL (64 rows: the
        for scan in ("seqscan", "bitmapscan", "sort"):  # planner would sort them unforced)
            conn.execute(text(f"SET LOCAL enable_{scan} = off"))
        sql = _knn_sql(es, "l2", "", 40, "q.v").replace(":k", "5")
        plan = "\n".join(conn.execute(text(
            f"EXPLAIN SELECT nn.* FROM unnest(CAST(:qs AS halfvec[])) AS q(v) "
            f"CROSS JOIN LATERAL ({sql}) nn"), {"qs": "{\"[0,0,0,0,0,0,0,0]\"}"}).scalars())
    assert f"latents_mu_hnsw_{set_id}" in plan, plan
    stored = half(mu)
    for i in (0, 17, 40):
        res = search(db, small, set_id, vector=mu[i], k=5)
        assert res.plan.startswith("hnsw(")
        assert [h.index for h in res.hits] == brute_force(stored, stored[i], 5)[0]


def test_a_partition_holds_its_rows_to_its_sets_vector_columns(db, model_id):
    """A writer that fills the other pair (an old worker during an upgrade) is refused by
    the partition's CHECK, not stored as NULLs the readers cannot read."""
    from sqlalchemy.exc import IntegrityError

    half_set = a_set(db, model_id, "halfvec", codes(8))
    vector_set = a_set(db, model_id, "vector", codes(9))
    for set_id, columns in ((half_set, "mu, logvar"), (vector_set, "mu_half, logvar_half")):
        with pytest.raises(IntegrityError, match="_vectors"), db.engine.begin() as conn:
            conn.execute(text(
                f"INSERT INTO latents (set_id, item_index, dataset_id, dataset_index, "
                f"{columns}, elbo, reconstruction, kl) SELECT set_id, 1000, dataset_id, "
                f"dataset_index, '[{','.join(['1'] * DIM)}]', '[{','.join(['1'] * DIM)}]', "
                f"0, 0, 0 FROM latents WHERE set_id = {set_id} LIMIT 1"))
    assert count_latents(db, half_set) == count_latents(db, vector_set) == N


def test_a_query_a_float16_cannot_hold_is_refused_and_others_are_rounded(db, model_id,
                                                                         settings):
    set_id = a_set(db, model_id, "halfvec", codes(10))
    with pytest.raises(InvalidInput, match="65504"):
        search(db, settings, set_id, vector=np.full(DIM, 1e5), k=3)
    with pytest.raises(InvalidInput, match="zero vector"):  # zero once rounded to float16
        search(db, settings, set_id, vector=np.full(DIM, 1e-9), k=3, metric="cosine")


def test_values_a_float16_cannot_hold_are_refused_and_nothing_is_written(db, model_id):
    from store.jobs import claim

    job, _ = submit_embedding(db, model_id, get_model(db, model_id).dataset_id,
                              vector_type="halfvec")
    claim(db, job.id, "w", 600)
    mu = codes(6)
    mu[7, 2] = 70_000.0
    with pytest.raises(InvalidInput, match="65504"):
        write_latents(db, job.embedding_set_id, 0, mu, np.zeros_like(mu), np.zeros(N),
                      np.zeros(N), np.zeros(N))
    assert count_latents(db, job.embedding_set_id) == 0


def test_an_append_keeps_the_sets_vector_type_and_a_bad_type_is_refused(db, model_id):
    set_id = a_set(db, model_id, "halfvec", codes(7))
    dataset = get_model(db, model_id).dataset_id
    with pytest.raises(InvalidInput, match="halfvec latents; an append uses the same"):
        submit_embedding(db, model_id, dataset, embedding_set_id=set_id, vector_type="vector")
    with pytest.raises(InvalidInput, match="vector_type 'float8'"):
        submit_embedding(db, model_id, dataset, vector_type="float8")
