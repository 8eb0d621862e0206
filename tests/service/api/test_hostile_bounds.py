"""Bounded work per request: attacks of a few hundred bytes that asked the API for millions
of configurations, rows, values or neighbours, each sent to the live API (`hostile_api`,
production-default bounds) and answered with a 4xx naming the setting, within a fraction
of a second, without the API's memory growing or /healthz stalling. Also the `.npy` body
reader (zip archives, headers that promise more than the body holds) and the database
statement timeout."""

import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from sqlalchemy import text

from service.api.codecs import load_npy
from store.errors import InvalidInput, TooLarge
from store.search import search_many
from store.settings import Settings
from tests.store.sets import ready_set, write_latents
from tests.support import Probe, Served, store_untrained_model

MiB = 1 << 20
NPY = "application/x-npy"
SMALL = {"family": "mlp", "latent_dim": 6, "hidden": [16], "likelihood": "bernoulli",
         "input_shape": [1, 8, 8]}
# items of 16,384 values: 4,096 of them (decode_max_rows) are 67M values, 268 MB as float32
LARGE = {"family": "mlp", "latent_dim": 8, "hidden": [16], "likelihood": "bernoulli",
         "input_shape": [1, 128, 128]}
DEFAULTS = Settings()
# what every attack must stay within (the goals: 100 MiB, a fraction of a second,
# /healthz under 100 ms; 0.5 s is asserted on this shared, loaded machine)
MAX_GROWTH, MAX_SECONDS, MAX_HEALTH = 100 * MiB, 1.0, 0.5


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def targets(api_db, api_settings, tmp_path_factory):
    """Two ready (untrained) models, a dataset of large items, and a ready embedding set."""
    from ingest.arrays import register_file
    from store.settings import open_artifacts

    tmp = tmp_path_factory.mktemp("hostile-bounds")
    for name in ("small", "large", "data"):
        (tmp / name).mkdir()
    small, _ = store_untrained_model(api_db, api_settings, str(tmp / "small"), SMALL)
    large, _ = store_untrained_model(api_db, api_settings, str(tmp / "large"), LARGE)
    # 128 items of 65,536 values: a page of all of them is 8.4M values (32 MiB as float32)
    path = tmp / "data" / "big-items.npy"
    np.save(path, np.random.default_rng(2).random((128, 1, 256, 256), dtype=np.float32))
    big_items = register_file(api_db, open_artifacts(api_settings), api_settings,
                              f"big-items-{time.monotonic_ns()}", str(path)).dataset
    n = 64  # the small model's dataset (store_untrained_model) has 64 items
    with api_db.session() as s:
        from store.tables import Model

        dataset_id = s.get(Model, small).dataset_id
    mu = np.random.default_rng(1).normal(size=(n, SMALL["latent_dim"])).astype(np.float32)
    set_id = ready_set(api_db, small, dataset_id, lambda set_id: write_latents(
        api_db, set_id, 0, mu, mu, np.zeros(n), np.zeros(n), np.zeros(n)))
    return {"small": small, "large": large, "items": big_items.id, "set": set_id,
            "dataset": dataset_id}


@pytest.fixture(scope="module")
def hostile(hostile_api, keys, targets):
    """A client of the hostile API with a write key, its caches warm for both models (a
    first decode opens the decoder's session: that memory is not the attack's)."""
    with httpx.Client(base_url=hostile_api.url, timeout=120,
                      headers={"Authorization": f"Bearer {keys['write']}"}) as c:
        for name in ("small", "large"):
            dim = (SMALL if name == "small" else LARGE)["latent_dim"]
            c.post(f"/v1/models/{targets[name]}/decode",
                   json={"z": [[0.0] * dim]}).raise_for_status()
            c.post(f"/v1/models/{targets[name]}/sample", json={"n": 2}).raise_for_status()
        yield c


def attack(api, send, status, *words, parsed=False):
    """Send one attack under a Probe; check its answer and its cost; return the figures.

    `parsed`: a body the API is meant to read whole (the largest allowed): the parse holds
    the GIL, so /healthz may wait as long as that one parse (0.6-0.7 s here under load), but
    never longer, and it never fails; its time is bench's business, not an assertion."""
    with Probe(api) as probe:
        answer = send()
    figures = (f"{answer.request.method} {answer.request.url.path}: {answer.status_code} in "
               f"{probe.elapsed * 1000:.0f} ms, +{probe.grown / MiB:.1f} MiB, slowest /healthz "
               f"{probe.slowest_health * 1000:.0f} ms")
    print(figures)
    assert answer.status_code == status, answer.text[:500]
    message = answer.json()["error"]["message"]
    for word in words:
        assert word in message, message
    assert probe.grown < MAX_GROWTH, figures
    assert probe.health_failures == 0, figures
    if parsed:
        assert probe.slowest_health < probe.elapsed + 0.1, figures
        return probe
    assert probe.elapsed < MAX_SECONDS, figures
    assert probe.slowest_health < MAX_HEALTH, figures
    return probe


# -- sweeps: the grid's product before anything is expanded --------------------------------

@pytest.mark.parametrize("fields", [6, 7])
def test_a_sweep_naming_millions_of_configurations_is_refused_before_expansion(
        hostile_api, hostile, targets, fields):
    grid = {f"model.f{i}": list(range(10)) for i in range(fields)}
    body = json.dumps({"dataset_id": targets["dataset"], "model": {}, "grid": grid})
    assert len(body) < 420  # a few hundred bytes for 10^6 / 10^7 configurations
    attack(hostile_api, lambda: hostile.post("/v1/sweeps", content=body, headers={
        "Content-Type": "application/json"}), 422, f"{10 ** fields} configurations",
        f"the limit is {DEFAULTS.sweep_max_configs}", "LATENTBANK_SWEEP_MAX_CONFIGS")


def test_a_sweep_of_many_single_value_fields_is_refused(hostile_api, hostile, targets):
    grid = {f"model.f{i}": [1] for i in range(2000)}  # a product of 1, 2,000 fields
    attack(hostile_api, lambda: hostile.post("/v1/sweeps", json={
        "dataset_id": targets["dataset"], "model": {}, "grid": grid}), 422,
        f"the limit is {DEFAULTS.sweep_max_fields}", "LATENTBANK_SWEEP_MAX_FIELDS")


# -- serving: rows counted with repeats, answers bounded by values ------------------------

def test_a_traversal_of_one_dimension_repeated_is_counted_row_by_row(
        hostile_api, hostile, targets):
    body = {"dims": [0] * 256, "steps": 64}  # 16,384 rows, past decode_max_rows (4,096)
    attack(hostile_api, lambda: hostile.post(f"/v1/models/{targets['small']}/traverse",
                                             json=body), 422, f"{256 * 64} rows",
        f"the limit is {DEFAULTS.decode_max_rows}", "LATENTBANK_DECODE_MAX_ROWS")
    # within the rows but not the values: 4,096 rows of 16,392 numbers (x and z)
    body = {"dims": [0] * 64, "steps": 64}
    attack(hostile_api, lambda: hostile.post(f"/v1/models/{targets['large']}/traverse",
                                             json=body), 413,
        f"{4096 * (128 * 128 + 8)} values", "LATENTBANK_MAX_RESPONSE_VALUES")


@pytest.mark.parametrize("answer", ["npy", "json"])
def test_a_decode_whose_answer_is_gigabytes_is_refused_on_both_paths(
        hostile_api, hostile, targets, answer):
    z = npy(np.zeros((DEFAULTS.decode_max_rows, LARGE["latent_dim"]), np.float32))  # 128 KiB
    total = DEFAULTS.decode_max_rows * 128 * 128  # 67M values: 268 MB as float32
    headers = {"Content-Type": NPY, "Accept": NPY if answer == "npy" else "application/json"}
    url = f"/v1/models/{targets['large']}/decode"
    for _ in range(2):  # the fast path (key and model cached) and the route say the same
        attack(hostile_api, lambda: hostile.post(url, content=z, headers=headers), 413,
               f"{total} values", f"at most {DEFAULTS.max_response_values}",
               "LATENTBANK_MAX_RESPONSE_VALUES")
    # a normal large decode still works: 4,096 rows of 784 values
    assert DEFAULTS.decode_max_rows * 784 <= DEFAULTS.max_response_values


def test_samples_and_interpolations_are_bounded_by_values(hostile_api, hostile, targets):
    per_row = 128 * 128 + 8  # x and z
    url = f"/v1/models/{targets['large']}"
    attack(hostile_api, lambda: hostile.post(f"{url}/sample", json={"n": 4096}), 413,
           f"4096 rows x {per_row} values", "LATENTBANK_MAX_RESPONSE_VALUES")
    assert 256 * per_row > DEFAULTS.max_response_values
    attack(hostile_api, lambda: hostile.post(f"{url}/interpolate", json={
        "z_from": [0] * 8, "z_to": [1] * 8, "steps": 256}), 413,
        f"256 rows x {per_row} values", "LATENTBANK_MAX_RESPONSE_VALUES")


def test_a_normal_large_decode_still_works(hostile_api, hostile, targets):
    z = npy(np.random.default_rng(0).standard_normal((4096, 6)).astype(np.float32))
    with Probe(hostile_api) as probe:
        got = hostile.post(f"/v1/models/{targets['small']}/decode", content=z,
                           headers={"Content-Type": NPY, "Accept": NPY})
    print(f"decode 4096 x 64 (npy): {got.status_code} in {probe.elapsed * 1000:.0f} ms, "
          f"+{probe.grown / MiB:.1f} MiB, /healthz {probe.slowest_health * 1000:.0f} ms")
    assert got.status_code == 200, got.text
    assert np.load(io.BytesIO(got.content)).shape == (4096, 1, 8, 8)
    with Probe(hostile_api) as probe:
        got = hostile.post(f"/v1/models/{targets['small']}/decode", content=z,
                           headers={"Content-Type": NPY})  # a JSON answer of 262,144 values
    print(f"decode 4096 x 64 (json): {got.status_code} in {probe.elapsed * 1000:.0f} ms, "
          f"+{probe.grown / MiB:.1f} MiB, /healthz {probe.slowest_health * 1000:.0f} ms")
    assert got.status_code == 200 and len(got.json()["x"]) == 4096
    assert probe.slowest_health < MAX_HEALTH


# -- dataset pages: items x values -----------------------------------------------------

def test_dataset_pages_of_large_items_are_bounded_by_values(hostile_api, hostile, targets):
    url = f"/v1/datasets/{targets['items']}"
    total = 128 * 256 * 256  # 8.4M values: 32 MiB as float32, ~100 MB as JSON
    attack(hostile_api, lambda: hostile.get(f"{url}/items", params={"limit": 256}), 413,
           f"128 rows x 65536 values is {total} values", "LATENTBANK_MAX_RESPONSE_VALUES")
    attack(hostile_api, lambda: hostile.get(f"{url}/thumbnails.png", params={"n": 256}), 413,
           "LATENTBANK_MAX_RESPONSE_VALUES")
    got = hostile.get(f"{url}/items", params={"limit": 4})  # a page within the bound
    assert got.status_code == 200 and np.asarray(got.json()["x"]).shape == (4, 1, 256, 256)


# -- search: queries x k ---------------------------------------------------------------

def test_a_batch_search_of_a_million_neighbours_is_refused(hostile_api, hostile, targets):
    body = {"queries": [{"vector": [0.0] * SMALL["latent_dim"]}] * 1000, "k": 1000}
    attack(hostile_api, lambda: hostile.post(f"/v1/embeddings/{targets['set']}/search/batch",
                                             json=body), 413, "1000000 neighbours",
           f"at most {DEFAULTS.search_max_results}", "LATENTBANK_SEARCH_MAX_RESULTS")
    body = {"queries": [{"vector": [0.0] * SMALL["latent_dim"]}] * 1000, "k": 10}
    got = hostile.post(f"/v1/embeddings/{targets['set']}/search/batch", json=body)
    assert got.status_code == 200, got.text  # the everyday batch: 1000 queries of k = 10
    answers = got.json()["answers"]
    assert len(answers) == 1000 and all(len(a["results"]) == 10 for a in answers)


@pytest.mark.slow
def test_an_exact_scan_is_bounded_by_queries_times_items(api_db, api_settings, targets):
    settings = api_settings.model_copy(update={"search_max_exact_scan": 64 * 10})
    queries = [np.zeros(SMALL["latent_dim"])] * 10
    assert len(search_many(api_db, settings, targets["set"], queries, k=5, exact=True)) == 10
    with pytest.raises(TooLarge, match="LATENTBANK_SEARCH_MAX_EXACT_SCAN") as raised:
        search_many(api_db, settings, targets["set"], queries + queries[:1], k=5, exact=True)
    assert "11 queries x 64 items is 704 distances" in str(raised.value)


@pytest.mark.stack  # starts uvicorn itself
def test_the_bounds_follow_their_settings(api_db, api_settings, targets):
    """k, and the values of encode / reconstruct answers (which the request-body limit
    keeps small at the defaults), by settings lowered on an app of their own."""
    from service.api.app import create_app
    from store.keys import create_key

    served = Served(create_app(api_settings.model_copy(update={
        "search_max_k": 50, "max_response_values": 1000})))
    try:
        headers = {"Authorization": f"Bearer {create_key(api_db, 'bounds', ['read']).key}"}
        with httpx.Client(base_url=served.url, timeout=60, headers=headers) as c:
            got = c.post(f"/v1/embeddings/{targets['set']}/search",
                         json={"vector": [0.0] * 6, "k": 51})
            assert got.status_code == 413, got.text
            assert "the limit is 50 (LATENTBANK_SEARCH_MAX_K)" in got.json()["error"]["message"]
            x = {"x": np.zeros((16, 64)).tolist()}  # 16 items of 64 values: 1,024 > 1,000
            got = c.post(f"/v1/models/{targets['small']}/reconstruct", json=x)
            assert got.status_code == 413, got.text
            assert "16 rows x 64 values is 1024 values" in got.json()["error"]["message"]
            got = c.post(f"/v1/models/{targets['small']}/encode", json=x)  # 16 x (6 + 6)
            assert got.status_code == 200 and len(got.json()["mu"]) == 16
    finally:
        served.stop()


# -- .npy bodies: the header is checked before anything is allocated ----------------------

def test_an_npz_body_or_a_header_promising_terabytes_is_a_422(hostile_api, hostile, targets):
    archive = io.BytesIO()
    np.savez(archive, z=np.zeros((2, 6), np.float32))
    url = f"/v1/models/{targets['small']}/decode"
    for _ in range(2):  # the route, then the fast path (warm): the same answer
        attack(hostile_api, lambda: hostile.post(url, content=archive.getvalue(), headers={
            "Content-Type": NPY}), 422, "an .npy body was expected, got a zip (.npz) archive")
    header = io.BytesIO()  # 8 TB announced, 8 bytes sent
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10 ** 12,)})
    attack(hostile_api, lambda: hostile.post(url, content=header.getvalue() + bytes(8),
                                             headers={"Content-Type": NPY}), 422,
           "declares shape [1000000000000]", "8000000000000 bytes", "holds 8 bytes")


def test_load_npy_reads_numpys_layouts_and_refuses_the_rest():
    for array in (np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.arange(4, dtype=">f4"),
                  np.zeros((0, 3)), np.float64(2).reshape(()), np.array([True, False])):
        got = load_npy(npy(array), "z")
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ones((2, 2), np.float32), version=(3, 0))
    np.testing.assert_array_equal(load_npy(buffer.getvalue(), "z"), np.ones((2, 2)))
    for raw, words in ((npy(np.ones(3))[:-1], "holds 23 bytes"),
                       (npy(np.ones(3)) + b"x", "holds 25 bytes"),
                       (b"hello", "magic bytes"), (npy(np.array(["a"])), "numeric"),
                       (npy(np.zeros(2, [("a", "f4")])), "numeric")):
        with pytest.raises(InvalidInput, match=words):
            load_npy(raw, "z")


# -- the database's statement timeout ------------------------------------------------------

@pytest.mark.stack  # starts uvicorn itself
def test_a_query_past_the_statement_timeout_is_a_503_naming_the_setting(api_db, api_settings,
                                                                      keys):
    """A real slow query: the table the route reads is locked by another transaction, so
    its SELECT waits; the server cancels it at the timeout and the API says why."""
    from service.api.app import create_app

    app = create_app(api_settings.model_copy(update={"db_statement_timeout_ms": 300}))
    with app.state.services.db.engine.connect() as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "300ms"
    served = Served(app)
    locked, release = threading.Event(), threading.Event()

    def hold_lock():
        with api_db.engine.begin() as conn:
            conn.execute(text("LOCK TABLE datasets IN ACCESS EXCLUSIVE MODE"))
            locked.set()
            release.wait(30)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        started = time.perf_counter()
        got = httpx.get(f"{served.url}/v1/datasets", timeout=10,
                        headers={"Authorization": f"Bearer {keys['read']}"})
        took = time.perf_counter() - started
        assert got.status_code == 503, got.text
        assert got.json()["error"]["code"] == "statement_timeout"
        assert "300 ms" in got.json()["error"]["message"]
        assert "LATENTBANK_DB_STATEMENT_TIMEOUT_MS" in got.json()["error"]["message"]
        assert got.headers["Retry-After"]
        assert 0.3 <= took < 3
    finally:
        release.set()
        holder.join(30)
        served.stop()


def test_the_statement_timeout_defaults_to_30_s_and_0_means_none():
    from store.db import statement_timeout

    assert DEFAULTS.db_statement_timeout_ms == 30_000
    assert statement_timeout(30_000) == {"options": "-c statement_timeout=30000"}
    assert statement_timeout(0) == {}


@pytest.mark.stack  # starts uvicorn itself
def test_a_delete_as_large_as_its_data_is_not_cut_by_the_timeout(api_db, api_settings, keys,
                                                                 tmp_path):
    """The cascade of a delete is as large as the data it removes: it runs without the
    timeout (here it waits 1 s for a lock on the metrics table, past a 300 ms timeout)."""
    from service.api.app import create_app

    model_id, _ = store_untrained_model(api_db, api_settings, str(tmp_path),
                                        {"input_shape": [1, 4, 4], "latent_dim": 2,
                                         "hidden": [4]})
    served = Served(create_app(api_settings.model_copy(update={"db_statement_timeout_ms": 300})))
    locked = threading.Event()

    def hold_lock():
        with api_db.engine.begin() as conn:
            conn.execute(text("LOCK TABLE training_metrics IN ACCESS EXCLUSIVE MODE"))
            locked.set()
            time.sleep(1.0)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        started = time.perf_counter()
        got = httpx.delete(f"{served.url}/v1/models/{model_id}", timeout=30,
                           headers={"Authorization": f"Bearer {keys['write']}"})
        assert got.status_code == 204, got.text
        assert time.perf_counter() - started >= 0.5  # it did wait for the lock
    finally:
        holder.join(30)
        served.stop()


# -- JSON bodies: parsed numbers cost ~17x their text in Python objects --------------------


def _json_rows(size, width):
    row = "[" + ",".join(["0.5"] * width) + "]"
    return ('{"z":[' + ",".join([row] * (size // (len(row) + 1))) + "]}").encode()


def test_a_json_body_of_millions_of_numbers_is_refused_before_parsing(hostile_api, hostile,
                                                                       targets):
    """16 MiB of JSON numbers (within max_request_bytes) parsed to 272 MiB of Python floats
    with a read key; JSON bodies have their own, smaller limit, and .npy is the way for
    large arrays."""
    body = _json_rows(16 * MiB - 100, 1000)
    assert len(body) > DEFAULTS.max_json_bytes
    attack(hostile_api, lambda: hostile.post(
        f"/v1/models/{targets['small']}/decode", content=body,
        headers={"Content-Type": "application/json"}), 413, "LATENTBANK_MAX_JSON_BYTES", ".npy")
    # chunked (no Content-Length): counted as it arrives
    attack(hostile_api, lambda: hostile.post(
        f"/v1/models/{targets['small']}/decode", content=iter([body[i:i + MiB] for i in range(
            0, len(body), MiB)]), headers={"Content-Type": "application/json"}),
        413, "LATENTBANK_MAX_JSON_BYTES")


def test_the_largest_json_body_allowed_stays_within_the_memory_bound(hostile_api, hostile,
                                                                     targets):
    """Just under max_json_bytes: parsed (in a worker thread), then refused for its width,
    within the bound on memory."""
    body = _json_rows(DEFAULTS.max_json_bytes - 100, 1000)
    attack(hostile_api, lambda: hostile.post(
        f"/v1/models/{targets['small']}/decode", content=body,
        headers={"Content-Type": "application/json"}), 422, "z", parsed=True)


def test_the_largest_score_request_stays_within_the_memory_bound(hostile_api, hostile, targets):
    """score_max_rows items x K = score_max_draws / items draws, with a read key: the
    likelihood's float64 temporaries are bounded by the decoder-call chunk (4M values a
    call took +372 MiB for 1024 x 784 values at K = 256; here 1024 x 64 at K = 256)."""
    x = np.random.default_rng(3).random((DEFAULTS.score_max_rows, 1, 8, 8), dtype=np.float32)
    k = DEFAULTS.score_max_draws // DEFAULTS.score_max_rows
    probe = attack_ok(hostile_api, lambda: hostile.post(
        f"/v1/models/{targets['small']}/score", params={"importance_samples": k},
        content=npy((x > 0.5).astype(np.float32)), headers={"Content-Type": NPY}))
    assert probe.grown < MAX_GROWTH


def attack_ok(api, send):
    """A request at the bounds that must succeed: its cost under a Probe."""
    with Probe(api) as probe:
        answer = send()
    print(f"{answer.request.url.path}: {answer.status_code} in {probe.elapsed * 1000:.0f} ms, "
          f"+{probe.grown / MiB:.1f} MiB, slowest /healthz {probe.slowest_health * 1000:.0f} ms")
    assert answer.status_code == 200, answer.text[:500]
    assert probe.slowest_health < MAX_HEALTH
    return probe
