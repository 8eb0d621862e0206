"""Submissions on real PostgreSQL: the model (or set) row and its job row in one
transaction, idempotency bound to the request, and the fit of a dataset to a model."""

import numpy as np
import pytest
from sqlalchemy import func, select

from store.errors import IdempotencyMismatch, InvalidInput, NotFound
from store.jobs import claim, finish
from store.submit import fits, submit_embedding, submit_training
from store.tables import Job, Model

CONFIG = {"model": {"family": "mlp", "input_shape": [4], "latent_dim": 2},
          "training": {"epochs": 1}}


@pytest.fixture(scope="module")
def dataset(db, tmp_path_factory):
    from ingest.arrays import register_file
    from store.artifacts import ArtifactStore
    from store.settings import Settings

    tmp = tmp_path_factory.mktemp("submit")
    np.save(tmp / "x.npy", np.random.default_rng(5).random((12, 4), dtype=np.float32))
    return register_file(db, ArtifactStore((tmp / "a").as_uri()), Settings(data_dir=tmp / "d"),
                         "submit-world", str(tmp / "x.npy")).dataset


def counts(db):
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Model)), s.scalar(
            select(func.count()).select_from(Job))


def test_a_training_submission_writes_its_model_and_job_together(db, dataset):
    job, created = submit_training(db, dataset.id, CONFIG)
    assert created and job.status == "queued" and job.kind == "train"
    with db.session() as s:
        model = s.get(Model, job.model_id)
        assert (model.status, model.config, model.dataset_id) == ("pending", CONFIG, dataset.id)
    before = counts(db)
    with pytest.raises(NotFound):
        submit_training(db, 10**12, CONFIG)
    assert counts(db) == before  # nothing written for a refused submission


def test_an_idempotency_key_answers_its_first_job_or_refuses_another_request(db, dataset):
    first, created = submit_training(db, dataset.id, CONFIG, idempotency_key="k-submit",
                                     request_hash="h1")
    before = counts(db)
    again, created_again = submit_training(db, dataset.id, CONFIG, idempotency_key="k-submit",
                                           request_hash="h1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyMismatch, match="k-submit"):
        submit_training(db, dataset.id, CONFIG, idempotency_key="k-submit", request_hash="h2")
    assert counts(db) == before


def test_fits_is_the_input_shape_or_as_many_values_for_an_mlp():
    assert fits([1, 8, 8], {"family": "conv", "input_shape": [1, 8, 8]})
    assert not fits([8, 8], {"family": "conv", "input_shape": [1, 8, 8]})
    assert fits([8, 8], {"family": "mlp", "input_shape": [64]})
    assert not fits([8, 9], {"family": "mlp", "input_shape": [64]})


def test_an_embedding_needs_a_ready_model_whose_input_fits_the_dataset(db, dataset):
    job, _ = submit_training(db, dataset.id, {**CONFIG, "model": {**CONFIG["model"],
                                                                  "input_shape": [5]}})
    claim(db, job.id, "trainer", 60)
    finish(db, job.id, "trainer", "succeeded")
    before = counts(db)
    with pytest.raises(InvalidInput, match=r"items \[4\] do not fit .* input shape \[5\]"):
        submit_embedding(db, job.model_id, dataset.id)
    with pytest.raises(InvalidInput, match="importance_samples"):
        submit_embedding(db, job.model_id, dataset.id, importance_samples=-1)
    assert counts(db) == before
