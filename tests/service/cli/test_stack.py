"""`latentbank up` and the client verbs, end to end: every number a verb prints is checked
against an independent computation (onnxruntime on the downloaded files, a NumPy brute
force over the exported latents). The last test stops the stack and starts it again."""

import collections
import json
import os
import re
import signal
import stat
import time

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.support import Up, alive, cli, cli_json, free_port

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def data_dir(stack):
    return stack.data_dir


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), d.target


@pytest.fixture(scope="module")
def trained(data_dir):
    """digits registered, a small model trained and every item embedded, by the verbs."""
    dataset = cli_json(data_dir, "datasets", "add", "--builtin", "digits")
    out = cli(data_dir, "train", "--dataset", dataset["id"], "--latent-dim", "4",
              "--hidden", "64,32", "--epochs", "3", "--importance-samples", "50", "--watch",
              "--json")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    embed = cli(data_dir, "embed", "--model", events[-1]["model_id"], "--dataset",
                dataset["id"], "--importance-samples", "20", "--watch", "--json")
    assert embed.returncode == 0, embed.stderr
    embed_events = [json.loads(line) for line in embed.stdout.splitlines()]
    return {"dataset": dataset, "train_events": events, "model_id": events[-1]["model_id"],
            "set_id": embed_events[-1]["embedding_set_id"]}


@pytest.fixture(scope="module")
def onnx(data_dir, trained, tmp_path_factory):
    import onnxruntime as ort

    folder = tmp_path_factory.mktemp("onnx")
    paths = cli_json(data_dir, "models", "onnx", trained["model_id"], "--out", folder)
    return {role: ort.InferenceSession(p, providers=["CPUExecutionProvider"])
            for role, p in paths.items()}


@pytest.fixture(scope="module")
def exported(data_dir, trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "set.parquet"
    out = cli(data_dir, "export", trained["set_id"], "-o", path)
    assert out.returncode == 0, out.stderr
    return pq.read_table(path).to_pylist()


def test_up_prints_the_url_and_an_admin_key_saved_for_the_owner_only(stack):
    key_file = stack.data_dir / "admin.key"
    assert key_file.read_text().strip() == stack.key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # its output went to a file: the key is not in it, only where it is
    log = stack.log.read_text()
    assert stack.key not in log and f"saved in {key_file} (mode 0600)" in log
    assert stat.S_IMODE((stack.data_dir / "stack.json").stat().st_mode) == 0o600
    assert not stack.data_dir.stat().st_mode & 0o022  # the CLI trusts what is in it
    for part in ("api", "worker", "beat"):
        assert stack.key not in (stack.data_dir / "logs" / f"{part}.log").read_text()
    assert stack.url == f"http://127.0.0.1:{stack.port}"
    ready = httpx.get(stack.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok",
                                                                  "broker": "ok"}
    keys = httpx.get(stack.url + "/v1/keys", timeout=10,
                     headers={"Authorization": f"Bearer {stack.key}"})
    assert keys.status_code == 200 and [k["scopes"] for k in keys.json()] == [["admin"]]
    assert alive(stack.info["api_pid"]) and alive(stack.info["worker_pid"])


def test_a_second_up_on_the_same_data_is_refused(stack):
    out = cli(stack.data_dir, "up", "--port", free_port(), timeout=60)
    assert out.returncode == 1
    assert "already runs from" in out.stderr and stack.url in out.stderr
    assert httpx.get(stack.url + "/readyz", timeout=10).status_code == 200


def test_up_on_a_busy_port_says_so(stack, tmp_path):
    out = cli(tmp_path / "other", "up", "--port", stack.port, timeout=60)
    assert out.returncode == 1
    assert f"port {stack.port} on 127.0.0.1 is in use" in out.stderr
    assert not (tmp_path / "other" / "postgres").exists()  # nothing was started


def test_train_watch_streams_the_job_to_its_end(trained):
    events = trained["train_events"]
    assert events[-1]["status"] == "succeeded" and events[-1]["progress"] == 1.0
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and len(events) >= 2


def test_models_show_reports_the_metrics_of_each_epoch(data_dir, trained):
    model = cli_json(data_dir, "models", "show", trained["model_id"])
    assert model["status"] == "ready" and model["config"]["model"]["latent_dim"] == 4
    val = [m for m in model["metrics"] if m["split"] == "val"]
    assert [m["epoch"] for m in val] == [1, 2, 3]
    # the importance-sampled estimate is a tighter lower bound than the ELBO
    assert all(m["log_px"] >= m["elbo"] - 1e-6 for m in val)
    assert model["summary"]["heldout_log_px"] >= model["summary"]["heldout_elbo"]
    listed = cli_json(data_dir, "models", "list")
    assert trained["model_id"] in [m["id"] for m in listed]


def test_exported_codes_equal_the_encoder_on_the_data(exported, onnx, digits):
    images, labels = digits
    rows = sorted(exported, key=lambda r: r["index"])
    assert [r["key"] for r in rows] == [str(i) for i in range(len(images))]
    assert [r["label"] for r in rows] == [str(v) for v in labels]
    mu, logvar = onnx["encoder"].run(["mu", "logvar"], {"x": images})
    np.testing.assert_allclose(np.asarray([r["mu"] for r in rows]), mu, atol=1e-5)
    np.testing.assert_allclose(np.asarray([r["logvar"] for r in rows]), logvar, atol=1e-5)


def test_search_equals_a_brute_force_over_the_export(data_dir, trained, exported):
    answer = cli_json(data_dir, "search", trained["set_id"], "--key", "7", "-k", "8")
    mu = {r["key"]: np.asarray(r["mu"], dtype=np.float64) for r in exported}
    others = [k for k in mu if k != "7"]
    d = np.asarray([np.linalg.norm(mu[k] - mu["7"]) for k in others])
    expected = [others[i] for i in np.argsort(d, kind="stable")[:8]]
    assert [h["key"] for h in answer["results"]] == expected
    np.testing.assert_allclose([h["distance"] for h in answer["results"]], np.sort(d)[:8],
                               rtol=1e-5)
    # with a label filter and a vector query
    q = [0.5, -0.5, 0.0, 1.0]
    answer = cli_json(data_dir, "search", trained["set_id"], "--vector", ",".join(map(str, q)),
                      "-k", "5", "--label", "3", "--label", "8")
    keep = [r for r in exported if r["label"] in ("3", "8")]
    d = np.linalg.norm(np.asarray([r["mu"] for r in keep]) - np.asarray(q), axis=1)
    assert [h["key"] for h in answer["results"]] == [keep[i]["key"]
                                                     for i in np.argsort(d, kind="stable")[:5]]


def test_decode_prior_samples_equal_onnxruntime(data_dir, trained, onnx, tmp_path):
    out = cli(data_dir, "decode", trained["model_id"], "--sample", "6", "--seed", "3",
              "--temperature", "0.5", "-o", tmp_path / "x.npy")
    assert out.returncode == 0, out.stderr
    z = (0.5 * np.random.default_rng(3).standard_normal((6, 4))).astype(np.float32)
    expected = onnx["decoder"].run(["probs"], {"z": z})[0]
    np.testing.assert_allclose(np.load(tmp_path / "x.npy", allow_pickle=False), expected,
                               atol=1e-6)


def test_decode_given_latents_to_npy_and_png(data_dir, trained, onnx, tmp_path):
    z = np.random.default_rng(9).standard_normal((20, 4)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    out = cli(data_dir, "decode", trained["model_id"], "--z", tmp_path / "z.npy",
              "-o", tmp_path / "x.npy")
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.load(tmp_path / "x.npy", allow_pickle=False),
                               onnx["decoder"].run(["probs"], {"z": z})[0], atol=1e-6)
    out = cli(data_dir, "decode", trained["model_id"], "--z", tmp_path / "z.npy",
              "-o", tmp_path / "grid.png")
    assert out.returncode == 0, out.stderr
    image = Image.open(tmp_path / "grid.png")
    # 20 items of 8x8 in rows of 16 (two rows), 1-pixel borders, scaled 4x
    assert image.format == "PNG" and image.size == ((16 * 9 + 1) * 4, (2 * 9 + 1) * 4)


def test_models_score_agrees_with_the_stored_figures(data_dir, trained, exported, digits,
                                                     tmp_path):
    np.save(tmp_path / "items.npy", digits[0][:100])
    got = cli_json(data_dir, "models", "score", trained["model_id"], tmp_path / "items.npy",
                   "-k", "20")  # the set's K; a threshold (K = 50) takes only its own K
    stored = sorted(exported, key=lambda r: r["index"])[:100]
    np.testing.assert_allclose(got["kl"], [r["kl"] for r in stored], rtol=1e-4, atol=1e-4)
    z = (np.asarray(got["log_px"]) - [r["log_px"] for r in stored]) / (
        np.sqrt(2) * np.asarray(got["log_px_se"]))
    # robustly, as in test_api_flow's /score check: the median |z|, the tails, the signs
    assert 0.3 <= np.median(np.abs(z)) <= 1.5, np.median(np.abs(z))
    assert np.mean(np.abs(z) <= 3) >= 0.9, np.sort(np.abs(z))[-5:]
    assert 25 <= np.sum(z > 0) <= 75, np.sum(z > 0)
    got = cli_json(data_dir, "models", "score", trained["model_id"], tmp_path / "items.npy",
                   "--fpr", "0.05")
    assert got["importance_samples"] == 50 and got["threshold"]["split"] == "validation"
    assert got["is_outlier"] == [v < got["threshold"]["value"] for v in got["log_px"]]
    out = cli(data_dir, "models", "score", trained["model_id"], tmp_path / "items.npy")
    assert out.returncode == 0, out.stderr
    assert "100 items scored (K = 0" in out.stdout


def test_models_traverse_writes_the_grid_and_the_arrays(data_dir, trained, onnx, exported,
                                                         tmp_path):
    item = exported[7]
    out = cli(data_dir, "models", "traverse", trained["model_id"], "--embedding",
              trained["set_id"], "--key", item["key"], "--top", "2", "--steps", "3", "--span",
              "1", "-o", tmp_path / "t.json")
    assert out.returncode == 0, out.stderr
    got = json.loads((tmp_path / "t.json").read_text())
    want = np.repeat(np.asarray(item["mu"])[None], 6, axis=0)
    for row, d in enumerate(got["dims"]):
        want[row * 3:(row + 1) * 3, d] += [-1, 0, 1]
    np.testing.assert_allclose(got["z"], want, atol=1e-6)
    np.testing.assert_allclose(got["x"], onnx["decoder"].run(
        ["probs"], {"z": want.astype(np.float32)})[0], atol=1e-5)
    out = cli(data_dir, "models", "traverse", trained["model_id"], "-o", tmp_path / "t.png")
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "t.png").size == ((9 * 9 + 1) * 4, (4 * 9 + 1) * 4)


def test_aliases_address_models_and_sets_and_guard_deletes(data_dir, trained, exported):
    model, dataset = trained["model_id"], trained["dataset"]["id"]
    got = cli_json(data_dir, "aliases", "set", "prod", "--model", model)
    assert got["target_id"] == model and got["kind"] == "model"
    assert cli_json(data_dir, "models", "show", "@prod")["id"] == model
    embed = cli(data_dir, "embed", "--model", "@prod", "--dataset", dataset, "--watch",
                "--json")
    assert embed.returncode == 0, embed.stderr
    second = json.loads(embed.stdout.splitlines()[-1])["embedding_set_id"]
    cli_json(data_dir, "aliases", "set", "scratch", "--embedding", second)
    q = exported[0]["mu"]
    by_alias = cli_json(data_dir, "search", "@scratch", "--vector", ",".join(map(str, q)))
    by_id = cli_json(data_dir, "search", second, "--vector", ",".join(map(str, q)))
    assert by_alias["results"] == by_id["results"]
    refused = cli(data_dir, "embeddings", "rm", second)
    assert refused.returncode == 1 and "alias 'scratch'" in refused.stderr
    shown = cli(data_dir, "aliases", "show", "scratch")
    assert shown.returncode == 0 and "created" in shown.stdout
    assert cli(data_dir, "aliases", "rm", "scratch").returncode == 0
    assert cli(data_dir, "embeddings", "rm", second).returncode == 0
    assert cli(data_dir, "embeddings", "show", second).returncode == 1
    bad = cli(data_dir, "models", "show", "@Nope")
    assert bad.returncode == 2 and "neither an id nor an alias" in bad.stderr
    assert cli(data_dir, "aliases", "rm", "prod").returncode == 0


def documented_sql():
    """The statements of the SQL views reference page's SQL block, verbatim."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[3] / "docs" / "reference" / "sql.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    return [q.strip() for q in blocks[0].split(";\n") if q.strip()]


def test_the_documented_sql_runs_verbatim_as_the_reader_and_agrees_with_the_api(data_dir, trained,
                                                                        stack):
    import psycopg

    set_id = trained["set_id"]
    dsn = cli(data_dir, "sql")
    assert dsn.returncode == 0, dsn.stderr
    dsn = dsn.stdout.strip()
    assert dsn.startswith("postgresql://latentbank_reader:")
    assert cli(data_dir, "aliases", "set", "prod", "--embedding", set_id).returncode == 0
    api = httpx.Client(base_url=stack.url, timeout=60,
                       headers={"Authorization": f"Bearer {stack.key}"})
    try:
        with psycopg.connect(dsn) as conn:
            nearest, joined, lowest, ready = [conn.execute(q).fetchall() for q in documented_sql()]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM public.api_keys")
        want = api.post(f"/v1/embeddings/{set_id}/search",
                        json={"key": "17", "k": 5, "exact": True}).json()["results"]
        assert len(nearest) == 5 and len(lowest) == 10 and ready
        assert [r[0] for r in nearest] == [h["key"] for h in want]
        np.testing.assert_allclose([r[2] for r in nearest], [h["distance"] for h in want],
                                   rtol=1e-5)
        for key, verdict, label, elbo, log_px in joined:
            item = api.get(f"/v1/embeddings/{set_id}/items/{key}").json()
            assert (label, elbo, log_px) == (item["label"], item["elbo"], item["log_px"])
            assert verdict in ("clean", "mislabelled")
        assert [r[0] for r in joined] == ["3", "42"]
        outliers = api.get(f"/v1/embeddings/{set_id}/outliers", params={"k": 10}).json()
        assert [r[0] for r in lowest] == [h["key"] for h in outliers["results"]]
        models = api.get("/v1/models", params={"status": "ready"}).json()
        models.sort(key=lambda m: (-m["summary"]["heldout_log_px"], m["id"]))
        assert [r[0] for r in ready] == [m["id"] for m in models]
        assert [r[4] for r in ready] == [m["summary"]["heldout_log_px"] for m in models]
    finally:
        api.close()
        cli(data_dir, "aliases", "rm", "prod")


def test_embed_into_appends_a_dataset_and_refuses_clashing_keys(data_dir, trained, digits,
                                                                tmp_path):
    images = digits[0]
    np.save(tmp_path / "new.npy", images[:40])
    np.save(tmp_path / "keys.npy", np.array([f"new-{i}" for i in range(40)]))
    added = cli_json(data_dir, "datasets", "add", tmp_path / "new.npy", "--keys",
                     tmp_path / "keys.npy", "--name", "appended")
    model, base = trained["model_id"], trained["dataset"]["id"]
    out = cli(data_dir, "embed", "--model", model, "--dataset", base, "--watch", "--json")
    assert out.returncode == 0, out.stderr
    set_id = json.loads(out.stdout.splitlines()[-1])["embedding_set_id"]
    out = cli(data_dir, "embed", "--model", model, "--dataset", added["id"], "--into", set_id,
              "--watch", "--json")
    assert out.returncode == 0, out.stderr
    assert cli_json(data_dir, "embeddings", "show", set_id)["n_items"] == len(images) + 40
    refused = cli(data_dir, "embed", "--model", model, "--dataset", base, "--into", set_id)
    assert refused.returncode == 1 and "in embedding set" in refused.stderr
    assert cli(data_dir, "embeddings", "rm", set_id).returncode == 0


def test_upload_a_local_file_with_labels(data_dir, digits, tmp_path):
    images, labels = digits
    np.save(tmp_path / "some.npy", images[:100].reshape(100, -1))
    np.save(tmp_path / "labels.npy", labels[:100])
    d = cli_json(data_dir, "datasets", "add", tmp_path / "some.npy", "--labels",
                 tmp_path / "labels.npy", "--name", "first-100")
    assert (d["name"], d["n_items"], d["item_shape"], d["has_labels"]) == (
        "first-100", 100, [64], True)
    assert d["id"] in [x["id"] for x in cli_json(data_dir, "datasets", "list")]
    human = cli(data_dir, "datasets", "list")
    assert human.returncode == 0 and "first-100" in human.stdout


def test_register_a_server_side_file_only_under_the_allowed_roots(stack, digits, tmp_path):
    images, _ = digits
    np.save(stack.allowed / "server.npy", images[:50])
    d = cli_json(stack.data_dir, "datasets", "add", "--uri", stack.allowed / "server.npy")
    assert (d["name"], d["n_items"], d["item_shape"]) == ("server", 50, [1, 8, 8])
    assert cli_json(stack.data_dir, "datasets", "show", d["id"])["checksum"] == d["checksum"]
    np.save(tmp_path / "outside.npy", images[:50])
    out = cli(stack.data_dir, "datasets", "add", "--uri", tmp_path / "outside.npy")
    assert out.returncode == 1 and out.stderr.startswith("error: 4"), out.stderr
    assert "outside the allowed roots" in out.stderr
    assert str(stack.allowed) not in out.stderr  # the server's folders are never echoed


def test_listings_and_ndjson_export(data_dir, trained, exported, tmp_path):
    sets = cli_json(data_dir, "embeddings", "list", "--model", trained["model_id"])
    assert [e["id"] for e in sets] == [trained["set_id"]]
    shown = cli_json(data_dir, "embeddings", "show", trained["set_id"])
    assert shown["stats"]["mean_elbo"] == pytest.approx(np.mean([r["elbo"] for r in exported]))
    kinds = {j["kind"] for j in cli_json(data_dir, "jobs", "list")}
    assert {"train", "embed"} <= kinds
    out = cli(data_dir, "export", trained["set_id"], "-o", tmp_path / "set.ndjson")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "set.ndjson").read_text().splitlines()]
    by_key = {r["key"]: r for r in exported}
    assert len(rows) == len(exported)
    for r in rows[:50]:
        np.testing.assert_allclose(r["mu"], by_key[r["key"]]["mu"], rtol=1e-6)
    human = cli(data_dir, "embeddings", "list")
    assert human.returncode == 0 and "ready" in human.stdout
    cells = [[c.strip() for c in re.split("[│┃]", line)] for line in human.stdout.splitlines()]
    header = next(c for c in cells if "vectors" in c)
    row = next(c for c in cells if c[1:2] == [str(trained["set_id"])])
    assert row[header.index("vectors")] == "vector"  # the set's vector_type, its own column


def test_sweep_and_config_file_become_the_right_jobs(data_dir, trained, tmp_path):
    (tmp_path / "cfg.yaml").write_text(
        f"dataset_id: {trained['dataset']['id']}\n"
        "model: {family: mlp, latent_dim: 2, hidden: [16]}\n"
        "training: {epochs: 1, seed: 5}\n")
    answer = cli_json(data_dir, "train", "--config", tmp_path / "cfg.yaml", "--beta", "2",
                      "--sweep", "model.latent_dim=2,3", "--set", "training.lr=0.01")
    assert len(answer["jobs"]) == 2
    params = [j["params"] for j in answer["jobs"]]
    assert sorted(p["model"]["latent_dim"] for p in params) == [2, 3]
    assert all(p["model"]["beta"] == 2 and p["model"]["hidden"] == [16] for p in params)
    assert all(p["training"]["lr"] == 0.01 and p["training"]["seed"] == 5 for p in params)
    for job in answer["jobs"]:
        out = cli(data_dir, "jobs", "watch", job["id"])
        assert out.returncode == 0, out.stderr
        # a pipe gets one line per change, then the outcome
        assert f"job {job['id']} succeeded: model {job['model_id']}" in out.stderr


def test_cancel_then_watch_exits_non_zero(data_dir, trained):
    job = cli_json(data_dir, "train", "--dataset", trained["dataset"]["id"], "--latent-dim",
                   "2", "--epochs", "5000")
    out = cli(data_dir, "jobs", "cancel", job["id"])
    assert out.returncode == 0, out.stderr
    watch = cli(data_dir, "jobs", "watch", job["id"])
    assert watch.returncode == 1
    assert watch.stderr.strip().splitlines()[-1].startswith(f"error: job {job['id']} cancelled")
    assert cli_json(data_dir, "jobs", "show", job["id"])["status"] == "cancelled"


def test_keys_over_http_and_direct(data_dir, stack):
    out = cli(data_dir, "keys", "create", "--name", "reader", "--scope", "read")
    assert out.returncode == 0, out.stderr
    reader = out.stdout.strip()
    direct = cli(data_dir, "keys", "create", "--name", "writer", "--scope", "write", "--direct")
    assert direct.returncode == 0, direct.stderr
    writer = direct.stdout.strip()
    assert cli_json(data_dir, "datasets", "list", LATENTBANK_API_KEY=writer)
    refused = cli(data_dir, "datasets", "add", "--builtin", "digits",
                  LATENTBANK_API_KEY=reader)
    assert refused.returncode == 1 and refused.stderr.startswith("error: 403")
    listed = {k["name"]: k for k in cli_json(data_dir, "keys", "list")}
    assert listed["reader"]["scopes"] == ["read"] and listed["writer"]["scopes"] == ["write"]
    assert cli(data_dir, "keys", "revoke", listed["reader"]["id"]).returncode == 0
    time.sleep(10.5)  # the API caches verified keys for 10 s
    gone = cli(data_dir, "models", "list", LATENTBANK_API_KEY=reader)
    assert gone.returncode == 1 and gone.stderr.startswith("error: 401")


@pytest.mark.parametrize(("args", "code", "reason"), [
    (["models", "show", "424242"], 1, "error: 404 Not Found: model 424242 does not exist"),
    (["train", "--epochs", "1"], 2, "error: which dataset?"),
    (["train", "--dataset", "1", "--set", "optimizer=sgd"], 2,
     "error: 'optimizer': settings are named model.<field> or training.<field>"),
    (["train", "--dataset", "1", "--latent-dim", "0"], 1, "error: 422"),
    (["decode", "1", "--sample", "2", "-o", "x.txt"], 2, "error: --out x.txt: write .npy or .png"),
    (["search", "1"], 2, "error: give exactly one of --key, --vector and --image"),
    (["datasets", "add"], 2, "error: give exactly one of PATH, --uri and --builtin"),
])
def test_failures_exit_non_zero_with_one_line(data_dir, trained, args, code, reason):
    out = cli(data_dir, *args)
    assert out.returncode == code, (out.stdout, out.stderr)
    assert out.stderr.startswith(reason), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_no_api_and_a_bad_key_are_told_apart(data_dir):
    down = cli(data_dir, "models", "list", LATENTBANK_URL=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 3 and "cannot reach the latentbank API" in down.stderr
    bad = cli(data_dir, "models", "list", LATENTBANK_API_KEY="lb_not-a-key")
    assert bad.returncode == 1 and bad.stderr.startswith("error: 401")


def test_status_shows_every_part_and_a_killed_beat_comes_back(data_dir, stack):
    status = cli_json(data_dir, "status")
    assert set(status["parts"]) == {"postgres", "redis", "worker", "beat", "api"}
    assert all(p["health"] in ("ok", "running") for p in status["parts"].values())
    beat = status["parts"]["beat"]
    os.kill(beat["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        part = cli_json(data_dir, "status")["parts"]["beat"]
        if part["restarts"] == beat["restarts"] + 1 and part["health"] == "running":
            break
        time.sleep(0.5)
    assert part["pid"] != beat["pid"] and alive(part["pid"]), part
    table = cli(data_dir, "status")
    assert table.returncode == 0 and "beat" in table.stdout and "uptime" in table.stdout
    assert "restarting the beat (restart 1)" in stack.log.read_text()


def test_sigint_stops_everything_and_a_second_up_reuses_the_data(stack, trained, tmp_path):
    """Last in this module: it stops the module's stack."""
    before = stack.processes()
    assert len(before) >= 5  # postgres (+ its helpers), redis, worker (+ pool child), api
    assert stack.stop(signal.SIGINT) == 0
    deadline = time.monotonic() + 30
    while any(alive(p) for p in before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in before if alive(p)]
    assert not (stack.data_dir / "stack.json").exists()

    again = Up(stack.data_dir, free_port(), tmp_path / "up2.log")
    try:
        assert again.key == stack.key  # the saved admin key is still valid
        models = cli_json(stack.data_dir, "models", "list")
        assert trained["model_id"] in [m["id"] for m in models]
        assert collections.Counter(d["name"] for d in cli_json(
            stack.data_dir, "datasets", "list"))["digits"] == 1
        running = again.processes()
    finally:
        assert again.stop(signal.SIGTERM) == 0
    deadline = time.monotonic() + 30
    while any(alive(p) for p in running) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in running if alive(p)]
    assert not os.path.exists(stack.data_dir / "stack.json")
