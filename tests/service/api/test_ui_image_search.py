"""The embedding set page's search by image in a real browser (headless Chromium driven by
Playwright, as tests/service/api/test_ui_browser.py): an image chosen in the page's file
input is searched through the API and its neighbours, their thumbnails and its score
against the held-out threshold are shown. The set is test_image_queries.py's RGB set,
served by the test session's API; no browser on the machine skips (fails under CI)."""

import json

import numpy as np
import pytest

from tests.service.api.test_image_queries import png, world  # noqa: F401 (a fixture)
from tests.service.api.test_ui_browser import (
    BROWSER,
    SHOTS,
    _browser_or_skip,
    ready,
    sign_in,
)

pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _browser_or_skip()
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


def test_an_image_chosen_on_the_set_page_shows_the_apis_neighbours(browser, api, keys, client,
                                                                    world,  # noqa: F811
                                                                    tmp_path):
    page, errors = browser
    i = 5
    sign_in(page, api.url, keys["read"])
    page.goto(f"{api.url}/ui/#/embeddings/{world['set']}")
    ready(page)
    path = tmp_path / "query.png"
    path.write_bytes(png(world["pixels"][i]))
    page.set_input_files("#image-file", str(path))
    page.wait_for_selector("#image-neighbours")
    shown = page.evaluate("window.latentbank.imageSearch")
    want = client.post(f"/v1/embeddings/{world['set']}/search", data={"k": "8"},
                       files={"image": ("q.png", path.read_bytes(), "image/png")}
                       ).json()["results"]
    assert [r["key"] for r in shown["results"]] == [r["key"] for r in want]
    assert shown["results"][0]["key"] == world["keys"][i]
    np.testing.assert_allclose([r["distance"] for r in shown["results"]],
                               [r["distance"] for r in want], rtol=1e-9, atol=1e-9)
    rows = page.eval_on_selector_all("#image-neighbours tbody tr",
                                     "els => els.map(e => e.dataset.key)")
    assert rows == [r["key"] for r in want]
    # the score against the model's held-out threshold (ELBOs over [-200, -100]: -198 at 1 %)
    score = shown["score"]
    assert score["threshold"]["value"] == pytest.approx(-198.0)
    assert score["is_outlier"] == [score["elbo"][0] < -198.0]
    assert "against the held-out threshold" in page.inner_text("#image-score")
    # each neighbour's own item, drawn from the dataset's thumbnails
    page.wait_for_function("[...document.querySelectorAll('#image-neighbours img.thumb')]"
                           ".every((img) => img.complete && img.naturalWidth > 0)")
    assert page.locator("#image-neighbours img.thumb").count() == len(want)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "image-search.png"), full_page=True)
    # an image dropped on the zone (a browser's drop event with the file in its
    # DataTransfer) searches the same way: another item, the API's neighbours of it
    j = 11
    dropped = png(world["pixels"][j])
    transfer = page.evaluate_handle(
        """(bytes) => { const dt = new DataTransfer();
           dt.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
           return dt; }""", list(dropped))
    page.dispatch_event("#image-drop", "dragover", {"dataTransfer": transfer})
    page.dispatch_event("#image-drop", "drop", {"dataTransfer": transfer})
    page.wait_for_function(
        f"window.latentbank.imageSearch && window.latentbank.imageSearch.results[0].key "
        f"=== {json.dumps(world['keys'][j])}")
    shown = page.evaluate("window.latentbank.imageSearch")
    want = client.post(f"/v1/embeddings/{world['set']}/search", data={"k": "8"},
                       files={"image": ("q.png", dropped, "image/png")}).json()["results"]
    assert [r["key"] for r in shown["results"]] == [r["key"] for r in want]
    np.testing.assert_allclose([r["distance"] for r in shown["results"]],
                               [r["distance"] for r in want], rtol=1e-9, atol=1e-9)
    assert not errors, errors


def test_an_image_for_a_set_of_arrays_shows_the_apis_reason(browser, api, keys, client,
                                                            world,  # noqa: F811
                                                            tmp_path):
    """A set whose dataset was not registered from images: the page shows the 409's words."""
    page, errors = browser
    from tests.service.api.test_image_queries import wait_job

    answer = client.post("/v1/embedding-jobs", json={"model_id": world["arrays_model"],
                                                     "dataset_id": client.get(
        f"/v1/models/{world['arrays_model']}").json()["dataset_id"]})
    assert answer.status_code == 202, answer.text
    job = wait_job(client, answer.json()["id"])
    assert job["status"] == "succeeded", job
    sign_in(page, api.url, keys["read"])
    page.goto(f"{api.url}/ui/#/embeddings/{job['embedding_set_id']}")
    ready(page)
    path = tmp_path / "query.png"
    path.write_bytes(png(world["pixels"][0]))
    page.set_input_files("#image-file", str(path))
    page.wait_for_selector("#image-error")
    assert "was not registered from images" in page.inner_text("#image-error")
    assert not errors, errors
