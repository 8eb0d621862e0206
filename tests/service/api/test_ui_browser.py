"""The web UI in a real browser (headless Debian Chromium driven by Playwright; nothing is
downloaded) against a real `latentbank up`: sign in, train from the form and watch it end,
the decoder playground against /decode, the latent scatter's neighbours against the API's
search, cancel, and a read-only key that sees no submit buttons. Screenshots go to
out/ui/ on every run.

Without a browser the tests skip with the reason on a developer machine, and fail under
CI=true (.ci/run installs Debian's `chromium` first)."""

import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support import Up, cli_json, free_port
from tests.support.waiting import wait_job

pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[3]
SHOTS = ROOT / "out" / "ui"
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_or_skip():
    if BROWSER is None:
        message = ("no Chromium on this machine (apt-get install chromium): the browser "
                   "tests cannot run")
        if os.environ.get("CI") == "true":
            pytest.fail(message + " -- and CI must run them")
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed (it is in the dev extra)")
    return sync_playwright


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    _browser_or_skip()
    root = tmp_path_factory.mktemp("ui")
    up = Up(root / "data", free_port(), root / "up.log")
    read_key = cli_json(up.data_dir, "keys", "create", "--name", "viewer", "--scope",
                        "read")["key"]
    client = httpx.Client(base_url=up.url, timeout=60,
                          headers={"Authorization": f"Bearer {up.key}"})
    try:
        yield {"up": up, "client": client, "read_key": read_key}
    finally:
        client.close()
        up.stop()


@pytest.fixture(scope="module")
def browser(stack):
    sync_playwright = _browser_or_skip()
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=BROWSER, headless=True,
                                     args=["--no-sandbox"])
        # bypass_csp: the page's CSP forbids eval, which Playwright's waits use
        context = chromium.new_context(viewport={"width": 1280, "height": 900},
                                       bypass_csp=True)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page, errors
        chromium.close()


def ready(page, timeout=60_000):
    page.wait_for_function("window.latentbank && window.latentbank.ready", timeout=timeout)


def sign_in(page, url, key):
    page.goto(f"{url}/ui/#/jobs")
    page.evaluate("sessionStorage.clear()")
    page.reload()  # a fresh page: the key lives only in this tab's session storage
    page.fill("#key", key)
    page.click("#signin-go")
    page.wait_for_selector("#nav:not([hidden])")
    ready(page)


def wait_status(page, job_id, statuses, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = page.inner_text(f'#jobs-table tr[data-job-id="{job_id}"] .status')
        if status in statuses:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} is still {status}")


@pytest.fixture(scope="module")
def trained(stack, browser):
    """Sign in, register the digits, submit a training job from the form, watch it finish
    in the live list: the demo's first half, from the page."""
    page, _ = browser
    up, client = stack["up"], stack["client"]
    sign_in(page, up.url, up.key)
    page.goto(f"{up.url}/ui/#/datasets")
    ready(page)
    page.click("#add-digits")
    page.wait_for_selector("#datasets-table tr[data-dataset-id] img.grid")
    assert [d["name"] for d in client.get("/v1/datasets").json()] == ["digits"]
    page.goto(f"{up.url}/ui/#/jobs")
    ready(page)
    assert page.locator("#ef-model option").count() == 0  # no model is ready yet
    page.fill("#tf-latent", "4")
    page.fill("#tf-hidden", "64")
    page.fill("#tf-epochs", "12")
    page.fill("#tf-k", "50")
    page.click("#tf-submit")
    page.wait_for_selector("#jobs-table tr[data-job-id]")
    job_id = int(page.get_attribute("#jobs-table tbody tr", "data-job-id"))
    page.wait_for_selector(f'#jobs-table tr[data-job-id="{job_id}"] .status-running, '
                           f'#jobs-table tr[data-job-id="{job_id}"] .status-succeeded')
    page.screenshot(path=str(SHOTS / "jobs.png"), full_page=True)
    assert wait_status(page, job_id, ("succeeded", "failed")) == "succeeded"
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["params"]["model"]["latent_dim"] == 4
    assert job["params"]["model"]["binarize"] == "dynamic"
    # the row shows the job's own final message and links its model, which the embedding
    # form now offers
    row = page.inner_text(f'#jobs-table tr[data-job-id="{job_id}"]')
    assert job["progress_message"] in row and f"model {job['model_id']}" in row
    page.wait_for_function("document.querySelector('#ef-model').value === "
                           f"'{job['model_id']}'")
    assert page.is_enabled("#ef-submit")
    return {"job": job, "model_id": job["model_id"]}


def test_the_playground_shows_what_decode_answers(stack, browser, trained):
    page, errors = browser
    client, model_id = stack["client"], trained["model_id"]
    page.goto(f"{stack['up'].url}/ui/#/models/{model_id}")
    ready(page)
    assert "held-out log p(x)" in page.inner_text("#model-summary")
    page.wait_for_selector("#curves .uplot")
    before = page.evaluate("window.latentbank.playground")
    assert before["z"] == [0.0] * 4
    # the sliders are ordered by held-out KL, most first
    kl = client.get(f"/v1/models/{model_id}").json()["summary"]["kl_per_dim"]
    dims = [int(d) for d in page.eval_on_selector_all(
        "#playground-sliders input", "els => els.map(e => e.dataset.dim)")]
    assert dims == sorted(range(4), key=lambda d: -kl[d])
    slider = page.locator(f'#playground-sliders input[data-dim="{dims[0]}"]')
    slider.fill("2.5")  # sets the value and fires input, as a drag does
    page.wait_for_function(f"window.latentbank.playground.decodes > {before['decodes']}")
    after = page.evaluate("window.latentbank.playground")
    assert after["z"][dims[0]] == 2.5 and after["x"] != before["x"]
    want = np.asarray(client.post(f"/v1/models/{model_id}/decode",
                                  json={"z": [after["z"]]}).json()["x"], np.float64).ravel()
    np.testing.assert_allclose(after["x"], want, rtol=0, atol=1e-6)
    # and the canvas holds those values: pixel (r, c) of the 8x8 item, scaled up
    pixels = page.evaluate("""() => {
        const c = document.getElementById('playground-canvas');
        const s = window.latentbank.playground.scale;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const out = [];
        for (let r = 0; r < 8; r++) for (let k = 0; k < 8; k++)
            out.push(d[((r * s) * c.width + k * s) * 4]);
        return out; }""")
    np.testing.assert_array_equal(pixels, np.round(255 * np.clip(want, 0, 1)))
    page.screenshot(path=str(SHOTS / "model.png"), full_page=True)
    assert not errors, errors


def test_a_click_in_the_scatter_shows_the_apis_neighbours(stack, browser, trained):
    page, errors = browser
    client, model_id = stack["client"], trained["model_id"]
    page.goto(f"{stack['up'].url}/ui/#/jobs")
    ready(page)
    page.select_option("#ef-model", str(model_id))
    page.fill("#ef-k", "10")
    page.click("#ef-submit")
    page.wait_for_function("document.querySelectorAll('#jobs-table tbody tr').length >= 2")
    job_id = int(page.get_attribute("#jobs-table tbody tr", "data-job-id"))
    assert wait_status(page, job_id, ("succeeded", "failed")) == "succeeded"
    set_id = client.get(f"/v1/jobs/{job_id}").json()["embedding_set_id"]
    page.goto(f"{stack['up'].url}/ui/#/embeddings/{set_id}")
    ready(page)
    points = page.evaluate("window.latentbank.scatter.points")
    assert len(points) == 1797  # every item of the set (the sample takes all below 2000)
    target = points[123]
    box = page.locator("#scatter").bounding_box()
    page.mouse.move(box["x"] + target["sx"], box["y"] + target["sy"])
    assert page.locator("#tooltip").is_visible()
    page.mouse.click(box["x"] + target["sx"], box["y"] + target["sy"])
    page.wait_for_selector("#neighbour-table")
    shown = page.evaluate("window.latentbank.scatter.neighbours")
    clicked = shown["key"]
    # the point clicked is the one under the cursor (or one drawn on top of it)
    near = [p for p in points if (p["sx"] - target["sx"]) ** 2 + (p["sy"] - target["sy"]) ** 2
            < 64]
    assert clicked in {p["key"] for p in near}
    want = client.post(f"/v1/embeddings/{set_id}/search",
                       json={"key": clicked, "k": 8}).json()["results"]
    assert [r["key"] for r in shown["results"]] == [r["key"] for r in want]
    np.testing.assert_allclose([r["distance"] for r in shown["results"]],
                               [r["distance"] for r in want], rtol=1e-9)
    rows = page.eval_on_selector_all("#neighbour-table tbody tr",
                                     "els => els.map(e => e.dataset.key)")
    assert rows == [r["key"] for r in want]
    page.screenshot(path=str(SHOTS / "embedding.png"), full_page=True)
    assert not errors, errors


@pytest.fixture(scope="module")
def a_set(stack, trained):
    """The id of an embedding set of the trained model: one an earlier test made, else one
    embedded here through the API (so a test that needs a set also runs alone)."""
    client = stack["client"]
    sets = client.get("/v1/embeddings", params={"model_id": trained["model_id"],
                                                 "status": "ready"}).json()
    if sets:
        return sets[0]["id"]
    dataset_id = client.get("/v1/datasets").json()[0]["id"]
    job = wait_job(client, client.post("/v1/embedding-jobs", json={
        "model_id": trained["model_id"], "dataset_id": dataset_id}).json()["id"])
    assert job["status"] == "succeeded", job
    return job["embedding_set_id"]


def test_an_index_builds_progress_and_a_graph_that_did_not_fit_are_shown(stack, browser,
                                                                          a_set):
    """The sets list and a set's page render what the API says of an index build: its
    share done while it runs, and what it was given and whether its graph fitted after.
    (The sets here are below the index threshold, so the API's answers are patched in
    the browser; the figures themselves are tested in tests/store/test_index_build.py.)"""
    page, errors = browser
    up, client, set_id = stack["up"], stack["client"], a_set
    running = {"phase": "building index: loading tuples", "tuples_done": 450,
               "fraction": 0.45, "workers": 1, "memory_mb": 64, "needed_mb": 2, "fits": True}
    ended = {"phase": "done", "fraction": 1.0, "workers": 1, "workers_launched": 0,
             "memory_mb": 1, "needed_mb": 4,
             "fits": False, "spilled_after": 1248, "seconds": 2.5, "index_mb": 3.1}

    def patch(route, change):
        answer = route.fetch()
        body = answer.json()
        for es in body if isinstance(body, list) else [body]:
            if es["id"] == set_id:
                es.update(change)
        route.fulfill(response=answer, json=body)

    page.route("**/v1/embeddings?limit=100", lambda r: patch(
        r, {"index_status": "building", "index_build": running, "vector_type": "halfvec"}))
    page.route(f"**/v1/embeddings/{set_id}", lambda r: patch(
        r, {"index_status": "ready", "index_build": ended, "vector_type": "halfvec"}))
    try:
        page.goto(f"{up.url}/ui/#/embeddings")
        ready(page)
        cell = page.inner_text(f'tr[data-set-id="{set_id}"] .index-status')
        assert cell == "building 45 % (building index: loading tuples)"
        dim = client.get(f"/v1/embeddings/{set_id}").json()["dim"]
        assert page.inner_text(f'tr[data-set-id="{set_id}"] .dim') == f"{dim} (halfvec)"
        page.goto(f"{up.url}/ui/#/embeddings/{set_id}")
        ready(page)
        summary = page.inner_text("dl.summary")
        assert "ready (graph did not fit in memory)" in summary
        assert f"{dim}-d halfvec (float16)" in summary
        assert ("1 process(es), 1 MiB given, 4 MiB needed (did not fit: spilled to disk "
                "after 1248 tuples), 2.5 s, 3.1 MiB on disk") in summary
    finally:
        page.unroute("**/v1/embeddings?limit=100")
        page.unroute(f"**/v1/embeddings/{set_id}")
    assert not errors, errors


def test_cancel_from_the_jobs_list(stack, browser, trained):
    page, _ = browser
    page.goto(f"{stack['up'].url}/ui/#/jobs")
    ready(page)
    page.fill("#tf-epochs", "2000")
    page.click("#tf-submit")
    page.wait_for_function("document.querySelectorAll('#jobs-table tbody tr').length >= 3")
    job_id = int(page.get_attribute("#jobs-table tbody tr", "data-job-id"))
    page.wait_for_selector(f'#jobs-table tr[data-job-id="{job_id}"] .status-running',
                           timeout=120_000)
    page.click(f'#jobs-table tr[data-job-id="{job_id}"] button.cancel')
    assert wait_status(page, job_id, ("cancelled",), timeout=120) == "cancelled"
    job = stack["client"].get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["cancel_requested"]


def test_a_read_key_sees_no_submit_buttons(stack, browser, trained):
    page, _ = browser
    sign_in(page, stack["up"].url, stack["read_key"])
    assert "read only" in page.inner_text("#who")
    assert page.locator("#train-form").count() == 0
    assert page.locator("#embed-form").count() == 0
    assert page.locator("button.cancel").count() == 0
    page.goto(f"{stack['up'].url}/ui/#/datasets")
    ready(page)
    assert page.locator("#upload").count() == 0
    # what it may read, it sees
    page.goto(f"{stack['up'].url}/ui/#/models/{trained['model_id']}")
    ready(page)
    assert page.locator("#playground-canvas").count() == 1
    # and the API still refuses it what the page does not offer
    answer = httpx.post(f"{stack['up'].url}/v1/training-jobs", json={},
                        headers={"Authorization": f"Bearer {stack['read_key']}"})
    assert answer.status_code == 403


def test_upload_from_the_page_with_a_progress_bar(stack, browser, trained, tmp_path):
    page, _ = browser
    sign_in(page, stack["up"].url, stack["up"].key)
    page.goto(f"{stack['up'].url}/ui/#/datasets")
    ready(page)
    data = np.random.default_rng(0).random((300, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", data)
    page.set_input_files("#upload-file", str(tmp_path / "noise.npy"))
    page.fill("#upload-name", "noise-from-the-ui")
    page.click("#upload-go")
    page.wait_for_selector("text=noise-from-the-ui", timeout=60_000)
    stored = [d for d in stack["client"].get("/v1/datasets").json()
              if d["name"] == "noise-from-the-ui"]
    assert len(stored) == 1 and stored[0]["n_items"] == 300
    page.click("text=noise-from-the-ui")
    page.wait_for_selector("img.grid")
    ready(page)
    page.screenshot(path=str(SHOTS / "dataset.png"), full_page=True)


def test_an_archive_of_images_uploaded_from_the_page_becomes_an_ingest_job(stack, browser,
                                                                          tmp_path):
    """A .zip of class folders (one file in it is not an image it claims to be): the page
    follows the job to its dataset, whose page shows colour thumbnails and names the
    unreadable file with its reason."""
    import io
    import zipfile

    from PIL import Image

    page, _ = browser
    sign_in(page, stack["up"].url, stack["up"].key)
    page.goto(f"{stack['up'].url}/ui/#/datasets")
    ready(page)
    archive = tmp_path / "pets.zip"
    colours = {"red": (230, 30, 30), "blue": (30, 30, 230)}
    with zipfile.ZipFile(archive, "w") as zf:
        for label, colour in colours.items():
            for i in range(20):
                buffer = io.BytesIO()
                Image.new("RGB", (12 + i, 10), colour).save(buffer, format="PNG")
                zf.writestr(f"pets/{label}/{i:02d}.png", buffer.getvalue())
        zf.writestr("pets/red/broken.png", b"not a png at all")
    page.set_input_files("#upload-file", str(archive))
    page.fill("#upload-name", "pets-from-the-ui")
    page.fill("#upload-image-size", "8")
    page.click("#upload-go")
    page.wait_for_selector("text=pets-from-the-ui", timeout=120_000)
    stored = [d for d in stack["client"].get("/v1/datasets").json()
              if d["name"] == "pets-from-the-ui"]
    assert len(stored) == 1 and stored[0]["n_items"] == 40
    assert (stored[0]["dtype"], stored[0]["item_shape"]) == ("uint8", [3, 8, 8])
    page.click("text=pets-from-the-ui")
    page.wait_for_selector("#ingest-failures")
    assert "red/broken.png" in page.inner_text("#ingest-failures")
    grid = Image.open(io.BytesIO(page.locator("img.grid").first.screenshot()))
    pixels = np.asarray(grid.convert("RGB")).reshape(-1, 3).astype(int)
    for colour in colours.values():  # both classes drawn in their colour
        assert (np.abs(pixels - colour).sum(axis=1) < 40).any()


def test_every_page_works_under_its_own_csp(stack, browser, trained):
    """The other tests bypass the page's Content-Security-Policy (Playwright's waits
    evaluate code); a user's browser enforces it. Here it is enforced: each page renders
    and the browser reports no violation and no script error."""
    up, client = stack["up"], stack["client"]
    sets = client.get("/v1/embeddings", params={"model_id": trained["model_id"],
                                                 "status": "ready"}).json()
    assert sets, "the scatter test made a set"
    pages = {"datasets": "#datasets-table tr[data-dataset-id] img.grid",
             "jobs": "#jobs-table tr[data-job-id]",
             f"models/{trained['model_id']}": "#playground-canvas",
             f"embeddings/{sets[0]['id']}": "#scatter"}
    context = browser[0].context.browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        problems = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("console", lambda m: problems.append(m.text)
                if m.type == "error" or "Content Security Policy" in m.text else None)
        page.goto(f"{up.url}/ui/#/jobs")
        page.fill("#key", up.key)
        page.click("#signin-go")
        page.wait_for_selector("#nav:not([hidden])")
        for route, selector in pages.items():
            page.goto(f"{up.url}/ui/#/{route}")
            page.wait_for_selector(selector, timeout=30_000)
            page.wait_for_load_state("networkidle")
    finally:
        context.close()
    assert not problems, problems
