"""Notebook output: `_repr_html_` shows the key figures and escapes everything."""

import html

import pytest
from latentbank_client import Dataset, EmbeddingSet, Job, Model
from latentbank_client.display import PNG, bar, html_table
from latentbank_client.results import build

HOSTILE = "<script>alert('x')</script>&"


def test_job_html_shows_status_and_escapes():
    job = build(Job, {"id": 3, "kind": "train", "status": "failed", "progress": 0.5,
                      "error": HOSTILE, "progress_message": "<b>epoch</b>"})
    out = job._repr_html_()
    assert "<script>" not in out and "<b>epoch" not in out
    assert html.escape(HOSTILE) in out and "failed" in out and bar(0.5) in out


@pytest.mark.parametrize("thing", [
    build(Model, {"id": 4, "status": "ready", "config": {"model": {
        "family": HOSTILE, "latent_dim": 8}, "training": {"epochs": 3}},
        "summary": {"heldout_log_px": -80.25, "heldout_elbo": -82.5}}),
    build(EmbeddingSet, {"id": 5, "status": HOSTILE, "n_items": 10, "dim": 4,
                         "index_status": "ready", "index_metric": "l2",
                         "stats": {"mean_elbo": -3.5}}),
    build(Dataset, {"id": 6, "name": HOSTILE, "n_items": 2, "item_shape": [1, 8, 8]}),
])
def test_html_of_models_sets_and_datasets_escapes(thing):
    out = thing._repr_html_()
    assert "<script>" not in out and html.escape(HOSTILE) in out
    assert out.count("<table>") == 1 and str(thing.id) in out


def test_model_html_shows_its_figures():
    model = build(Model, {"id": 4, "status": "ready", "config": {"model": {
        "family": "mlp", "latent_dim": 8}}, "summary": {"heldout_log_px": -80.25}})
    out = model._repr_html_()
    assert "held-out log_px" in out and "-80.25" in out and "mlp" in out


def test_table_leaves_out_missing_values_and_escapes_names():
    out = html_table("<t>", [("<n>", 1), ("gone", None)])
    assert "&lt;t&gt;" in out and "&lt;n&gt;" in out and "gone" not in out


def test_png_shows_inline():
    assert PNG(b"\x89PNG data")._repr_png_() == b"\x89PNG data"
