"""The issue's promise, literally: a fresh virtualenv with only `pip install ./clients/python`
(no torch, nothing of the server) runs the contract script against a real stack, with typed
results and typed errors. The script's numbers are checked against the API's own JSON,
fetched here with plain httpx."""

import json
import os
import subprocess
import venv
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support import Up, free_port

# in `make test-system` (CI runs it): a pip install from the package index takes a minute
pytestmark = [pytest.mark.slow, pytest.mark.system, pytest.mark.timeout(600)]
CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"

SCRIPT = r"""
import json, sys
import numpy as np
from latentbank_client import Client, NotFound

client = Client()                                    # LATENTBANK_URL / LATENTBANK_API_KEY
ds = client.datasets.add(np.random.default_rng(0).random((300, 16)).astype("float32"),
                         name="fresh", labels=np.arange(300) % 3)
job = client.models.train(ds.id, model={"family": "mlp", "latent_dim": 3, "hidden": [16]},
                          training={"epochs": 2})
model = job.wait(progress=True).model()
emb = client.embeddings.create(model.id, ds.id, importance_samples=5).wait().embedding_set()
by_key = emb.search(key="7", k=4)
by_vector = emb.search(vector=np.zeros(3, dtype="float32"), k=4)
samples = model.sample(6, seed=0)
scores = model.score(np.random.default_rng(1).random((5, 16)).astype("float32"), fpr=0.1)
try:
    client.models.get(999999)
    missing = None
except NotFound as e:
    missing = type(e).__name__
out = {"modules": sorted(m for m in sys.modules if m.split(".")[0] in
                         ("torch", "celery", "sqlalchemy", "service", "store", "workers")),
       "types": [type(x).__name__ for x in (ds, job, model, emb, by_key[0], scores)],
       "model": model.id, "set": emb.id, "dataset": ds.id,
       "by_key": [[h.key, h.distance] for h in by_key],
       "by_vector": [[h.key, h.distance] for h in by_vector],
       "samples": list(samples.shape), "log_px": scores.log_px.tolist(),
       "is_outlier": scores.is_outlier.tolist(), "missing": missing}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh-venv-stack")
    stack = Up(root / "data", free_port(), root / "up.log",
               LATENTBANK_EXACT_SEARCH_BELOW="100000")
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


def test_a_fresh_virtualenv_with_only_the_client_runs_the_contract_script(up, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)  # no system site-packages: torch is not there
    python = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("LATENTBANK_", "PYTHONPATH", "VIRTUAL_ENV"))}
    install = subprocess.run([python, "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", str(CLIENT)],
                             capture_output=True, text=True, env=clean, timeout=400,
                             stdin=subprocess.DEVNULL)
    assert install.returncode == 0, install.stderr[-2000:]
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, env=clean)
    assert no_torch.returncode != 0  # the venv holds the client and its two dependencies
    run = subprocess.run([python, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, stdin=subprocess.DEVNULL,
                         env={**clean, "LATENTBANK_URL": up.url, "LATENTBANK_API_KEY": up.key})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["modules"] == []
    assert out["types"] == ["Dataset", "Job", "Model", "EmbeddingSet", "Hit", "Scores"]
    assert out["missing"] == "NotFound"
    assert out["samples"] == [6, 16]
    # the same searches and scores through the raw API, compared number for number
    http = httpx.Client(base_url=up.url, headers={"Authorization": f"Bearer {up.key}"},
                        timeout=60)
    with http:
        want = http.post(f"/v1/embeddings/{out['set']}/search",
                         json={"key": "7", "k": 4}).json()["results"]
        assert [h[0] for h in out["by_key"]] == [h["key"] for h in want]
        np.testing.assert_allclose([h[1] for h in out["by_key"]],
                                   [h["distance"] for h in want], rtol=1e-6)
        # by vector at the origin: the distance is the norm of each hit's stored mu
        for key, distance in out["by_vector"]:
            mu = np.asarray(http.get(f"/v1/embeddings/{out['set']}/items/{key}").json()["mu"])
            assert distance == pytest.approx(float(np.linalg.norm(mu)), rel=1e-5)
    assert len(out["log_px"]) == len(out["is_outlier"]) == 5
