"""The client against a real `latentbank up` (PostgreSQL, Redis, a worker, the API): the
issue's contract script, sync and async, with its numbers checked independently."""

import asyncio
import contextlib
import io

import httpx
import numpy as np
import pytest
from latentbank_client import (
    AsyncClient,
    Client,
    Forbidden,
    InvalidInput,
    NotFound,
    RetryPolicy,
)

from tests.support import Up, free_port

pytestmark = [pytest.mark.slow, pytest.mark.stack]


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    root = tmp_path_factory.mktemp("client-stack")
    stack = Up(root / "data", free_port(), root / "up.log",
               LATENTBANK_EXACT_SEARCH_BELOW="100000", LATENTBANK_SSE_POLL_SECONDS="0.2")
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


@pytest.fixture(scope="module")
def client(up):
    with Client(url=up.url, key=up.key) as c:
        yield c


@pytest.fixture(scope="module")
def trained(client):
    """The contract script's first half: a dataset from an array, a model, a set."""
    rng = np.random.default_rng(0)
    x = rng.random((500, 64)).astype("float32")
    ds = client.datasets.add(x, name="demo", labels=np.arange(500) % 5)
    job = client.models.train(ds.id, model={"family": "mlp", "latent_dim": 4, "hidden": [32]},
                              training={"epochs": 3})
    shown = io.StringIO()
    with contextlib.redirect_stderr(shown):
        finished = job.wait(progress=True)
    model = finished.model()
    emb = client.embeddings.create(model.id, ds.id, importance_samples=10).wait() \
        .embedding_set()
    return {"x": x, "ds": ds, "job": job, "finished": finished, "model": model, "emb": emb,
            "shown": shown.getvalue()}


def exported(emb):
    """The set's rows as NumPy (from the streamed Parquet export): keys, labels, mu,
    log_px."""
    table = emb.to_arrow()
    keys = table.column("key").to_pylist()
    mu = np.asarray(table.column("mu").to_pylist(), dtype=np.float64)
    return {"keys": keys, "labels": table.column("label").to_pylist(), "mu": mu,
            "log_px": np.asarray(table.column("log_px").to_pylist(), dtype=np.float64),
            "rows": table.num_rows}


def test_contract_script(client, trained):
    ds, model, emb, finished = trained["ds"], trained["model"], trained["emb"], \
        trained["finished"]
    assert (ds.n_items, ds.item_shape, ds.has_labels, ds.name) == (500, [64], True, "demo")
    assert trained["job"].kind == "train" and trained["job"].status in ("queued", "running",
                                                                        "succeeded")
    assert finished.status == "succeeded" and finished.progress == 1.0
    assert model.id == finished.model_id and model.status == "ready"
    assert model.latent_dim == 4 and model.item_shape == (64,)
    assert (emb.n_items, emb.dim, emb.importance_samples, emb.model_id) == (500, 4, 10,
                                                                            model.id)

    page = ds.items(offset=10, limit=4)
    np.testing.assert_array_equal(page.x, trained["x"][10:14])  # stored as sent (float32)
    assert page.keys == ["10", "11", "12", "13"] and page.labels == ["0", "1", "2", "3"]

    hits = client.embeddings.get(emb.id).search(key="7", k=5)
    rows = exported(emb)
    assert rows["rows"] == 500 and sorted(rows["keys"], key=int) == [str(i) for i in range(500)]
    mu = rows["mu"]
    at = {k: i for i, k in enumerate(rows["keys"])}
    distances = np.linalg.norm(mu - mu[at["7"]], axis=1)
    distances[at["7"]] = np.inf  # a key query leaves its own item out
    nearest = np.argsort(distances, kind="stable")[:5]
    assert [h.key for h in hits] == [rows["keys"][i] for i in nearest]
    np.testing.assert_allclose([h.distance for h in hits], distances[nearest], rtol=1e-4,
                               atol=1e-5)
    assert all(h.label == str(int(h.key) % 5) for h in hits)
    assert hits.plan and "exact" in hits.plan

    try:
        import pandas
    except ImportError:
        pandas = None
    if pandas is not None:
        df = emb.to_pandas()
        assert len(df) == emb.n_items == 500
        assert {"key", "label", "mu", "elbo", "log_px"} <= set(df.columns)

    samples = model.sample(16, seed=0)
    assert samples.shape == (16, 64) and samples.dtype == np.float32
    drawn = model.sample(16, seed=0, return_latents=True)
    # the server draws z from N(0, I) with numpy's default_rng(seed), then decodes
    np.testing.assert_allclose(drawn.z, np.random.default_rng(0).standard_normal((16, 4)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.decode(drawn.z), samples, rtol=1e-5, atol=1e-6)

    new = np.random.default_rng(1).random((8, 64)).astype("float32")
    scores = model.score(new, fpr=0.05)
    assert scores.log_px.shape == (8,) and scores.is_outlier.shape == (8,)
    assert scores.is_outlier.dtype == np.bool_
    statistic = scores.log_px if scores.threshold.statistic == "log_px" else scores.elbo
    np.testing.assert_array_equal(scores.is_outlier, statistic < scores.threshold.value)
    assert scores.threshold.fpr == 0.05
    np.testing.assert_allclose(scores.elbo, scores.reconstruction - scores.kl, rtol=1e-6,
                               atol=1e-4)

    with pytest.raises(NotFound) as caught:
        client.models.get(999999)
    assert caught.value.status == 404 and "999999" in str(caught.value)

    assert f"job {finished.id} (train)" in trained["shown"]  # progress was shown


def test_serving_and_search_against_numpy(client, trained):
    model, emb, x = trained["model"], trained["emb"], trained["x"]
    rows = exported(emb)
    at = {k: i for i, k in enumerate(rows["keys"])}
    encoded = model.encode(x[:3])
    assert encoded.mu.shape == (3, 4) and encoded.logvar.shape == (3, 4)
    # the set's mu is the encoder's mean of each item: the same numbers by another route
    np.testing.assert_allclose(encoded.mu, rows["mu"][[at["0"], at["1"], at["2"]]],
                               rtol=1e-4, atol=1e-5)
    item = emb.item("2")
    np.testing.assert_allclose(item.mu, encoded.mu[2], rtol=1e-4, atol=1e-5)

    by_vector = emb.search(vector=encoded.mu[0], k=3)
    assert by_vector[0].key == "0" and by_vector[0].distance < 1e-3
    many = emb.search_many(encoded.mu[:2], keys=["7"], k=5)
    assert [a[0].key for a in many[:2]] == ["0", "1"]
    assert [h.key for h in many[2]] == [h.key for h in emb.search(key="7", k=5)]
    only = emb.search(key="7", k=5, filter={"label": "3"})
    assert only and all(h.label == "3" for h in only)

    worst = emb.outliers(k=5)
    assert worst.ranked_by == "log_px"
    np.testing.assert_allclose(sorted(h.log_px for h in worst),
                               np.sort(rows["log_px"])[:5], rtol=1e-9)

    traversal = model.traverse(dims=[0, 1], steps=3, span=2.0)
    assert traversal.x.shape == (6, 64) and traversal.dims == [0, 1]
    np.testing.assert_allclose(traversal.z[:3, 0], [-2.0, 0.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(model.decode(traversal.z), traversal.x, rtol=1e-5, atol=1e-6)

    metrics = model.metrics()
    assert sorted({m.epoch for m in metrics}) == [1, 2, 3]  # training={"epochs": 3}

    with pytest.raises(InvalidInput, match="shape"):
        model.decode(np.zeros((2, 5)))


def test_aliases_keys_and_html(client, up, trained):
    model, emb = trained["model"], trained["emb"]
    client.aliases.set("prod", model=model.id)
    assert client.models["@prod"].id == model.id
    client.aliases.set("prod-set", embedding_set=emb.id)
    assert client.embeddings["@prod-set"].id == emb.id
    created = client.keys.create("reader", ["read"])
    with Client(url=up.url, key=created.key) as reader:
        assert reader.whoami().scopes == ["read"]
        assert reader.models.get(model.id).id == model.id
        with pytest.raises(Forbidden):
            reader.models.train(trained["ds"].id, model={"family": "mlp", "latent_dim": 2})
    assert client.keys.revoke(created.id).revoked_at is not None
    for thing in (trained["finished"], model, emb, trained["ds"]):
        html = thing._repr_html_()
        assert html.startswith("<div class='latentbank'>") and str(thing.id) in html


def test_config_finds_the_running_stack(up, monkeypatch):
    for name in ("LATENTBANK_URL", "LATENTBANK_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LATENTBANK_DATA_DIR", str(up.data_dir))
    with Client() as c:
        assert (c.url, c.key) == (up.url.rstrip("/"), up.key)
        assert c.health()["status"] == "ok"


class DropFirstAnswer(httpx.HTTPTransport):
    """A real transport that loses the server's first answer to a training submission
    (the server did the work; the client sees a broken connection)."""

    def __init__(self):
        super().__init__()
        self.keys = []

    def handle_request(self, request):
        response = super().handle_request(request)
        if request.url.path == "/v1/training-jobs":
            self.keys.append(request.headers.get("idempotency-key"))
            if len(self.keys) == 1:
                response.read()
                response.close()
                raise httpx.ReadError("connection lost after the server answered",
                                      request=request)
        return response


def test_retried_submission_makes_one_job(up, client, trained):
    transport = DropFirstAnswer()
    before = client.jobs.list(kind="train")
    with Client(url=up.url, key=up.key, transport=transport,
                retry=RetryPolicy(backoff=0.01)) as flaky:
        job = flaky.models.train(trained["ds"].id, model={"family": "mlp", "latent_dim": 2},
                                 training={"epochs": 1})
        job.cancel()  # the worker need not train it
    after = client.jobs.list(kind="train")
    assert len(transport.keys) == 2 and transport.keys[0] == transport.keys[1]
    assert len(after) == len(before) + 1 and after[0].id == job.id


def test_async_client(up, trained):
    model, emb, x = trained["model"], trained["emb"], trained["x"]

    async def flow():
        async with AsyncClient(url=up.url, key=up.key) as c:
            small = await c.datasets.add(x[:120], name="async", keys=[f"k{i}" for i in range(120)])
            assert small.n_items == 120
            job = await c.models.train(small.id, model={"family": "mlp", "latent_dim": 2,
                                                        "hidden": [16]},
                                       training={"epochs": 1})
            states = []
            finished = await job.wait(progress=states.append)
            assert finished.status == "succeeded" and states[-1]["status"] == "succeeded"
            got = await finished.model()
            assert got.latent_dim == 2
            served = await c.models.get(model.id)
            one, two = await asyncio.gather(served.sample(4, seed=3), served.sample(4, seed=3))
            np.testing.assert_array_equal(one, two)
            hits = await (await c.embeddings.get(emb.id)).search(key="7", k=5)
            scores = await served.score(x[:8], importance_samples=5, seed=0)
            with pytest.raises(NotFound):
                await c.models.get(999999)
            return hits, scores

    hits, scores = asyncio.run(flow())
    with Client(url=up.url, key=up.key) as c:
        same = c.embeddings.get(emb.id).search(key="7", k=5)
        again = c.models.get(model.id).score(x[:8], importance_samples=5, seed=0)
    assert [h.key for h in hits] == [h.key for h in same]
    np.testing.assert_allclose(scores.log_px, again.log_px, rtol=1e-6)


def test_add_a_file_and_a_folder(client, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    np.save(tmp_path / "small.npy", rng.random((30, 8)).astype("float32"))
    np.save(tmp_path / "labels.npy", np.arange(30) % 3)
    ds = client.datasets.add(tmp_path / "small.npy", labels=tmp_path / "labels.npy")
    assert (ds.name, ds.n_items, ds.item_shape, ds.has_labels) == ("small", 30, [8], True)

    photos = tmp_path / "photos"
    for label in ("cat", "dog"):
        (photos / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(photos / label / f"{i}.png")
    states = []
    folder = client.datasets.add(photos, image_size=8, color="grey", progress=states.append)
    assert (folder.name, folder.n_items) == ("photos", 6)
    assert folder.item_shape[-2:] == [8, 8]
    assert folder.thumbnails(n=6).data[:8] == b"\x89PNG\r\n\x1a\n"
    assert states and states[-1]["kind"] == "ingest" and states[-1]["status"] == "succeeded"
    assert states[-1]["dataset_id"] == folder.id
    # a model of those images, searched and scored by an image file
    model = client.models.train(folder, model={"family": "mlp", "latent_dim": 2, "hidden": [8]},
                                training={"epochs": 1, "val_fraction": 0}).result()
    emb = client.embeddings.create(model, folder).result()
    query = photos / "dog" / "1.png"
    hits = emb.search(image=query, k=2)
    assert hits[0].key == "dog/1.png" and hits[0].distance < 1e-4
    encoded = model.encode(image=query)
    table = emb.to_arrow()
    stored = table.column("mu").to_pylist()[table.column("key").to_pylist().index("dog/1.png")]
    np.testing.assert_allclose(encoded.mu[0], stored, rtol=1e-4, atol=1e-5)
    item = emb.item("dog/1.png")  # a key with a slash, as an image folder's keys are
    assert item.key == "dog/1.png"
    np.testing.assert_allclose(item.mu, stored, rtol=1e-6)
    scores = model.score(image=query.read_bytes())
    assert scores.n_items == 1 and scores.elbo.shape == (1,)


def test_plots(trained):
    import matplotlib.figure

    curves = trained["model"].plot_curves()
    assert isinstance(curves, matplotlib.figure.Figure) and len(curves.axes) == 3
    assert trained["model"].curves_png().data[:8] == b"\x89PNG\r\n\x1a\n"
    latents = trained["emb"].plot_latents()
    (scatter,) = latents.axes[0].collections
    assert len(scatter.get_offsets()) == trained["emb"].n_items == 500
