"""Jobs and the submissions that make them: training, sweeps, embedding."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.api.schemas.common import MAX_ID, Ref
from store.tables import Job


class JobOut(BaseModel):
    id: int
    kind: str = Field(examples=["train"])
    status: str = Field(examples=["running"])
    progress: float = Field(ge=0, le=1, examples=[0.42])
    progress_message: str | None = None
    eta_seconds: float | None = None
    items_done: int = Field(0, description="the attempt's work done: epochs recorded "
                                           "(training), items embedded (embedding), items "
                                           "read (ingest; `progress` is its bytes read)")
    items_total: int | None = Field(None, description="of how many (null before a start)")
    attempts: int
    max_attempts: int
    error: str | None = None
    cancel_requested: bool
    model_id: int | None = None
    embedding_set_id: int | None = None
    dataset_id: int | None = Field(None, description="the dataset an ingest job registered "
                                                     "(once it succeeded)")
    sweep_id: str | None = None
    params: dict[str, Any]
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    published: bool
    mlflow: dict[str, Any] | None = Field(
        None, description="a training job's MLflow run (GET /v1/jobs/{id} only, with the "
                          "bridge configured): `run_id`, `in_sync` (the run holds every "
                          "epoch, the status and the registered version latentbank has), "
                          "`epochs_logged` of `epochs_recorded`, `registered_model`, "
                          "`registered_version`, the last `error`, `synced_at`")

    @classmethod
    def of(cls, j: Job) -> JobOut:
        return cls(id=j.id, kind=j.kind, status=j.status, progress=min(max(j.progress, 0), 1),
                   progress_message=j.progress_message, eta_seconds=j.eta_seconds,
                   items_done=j.items_done or 0, items_total=j.items_total,
                   attempts=j.attempts, max_attempts=j.max_attempts, error=j.error,
                   cancel_requested=j.cancel_requested, model_id=j.model_id,
                   embedding_set_id=j.embedding_set_id, dataset_id=j.dataset_id,
                   sweep_id=j.sweep_id, params=_public_params(j),
                   created_at=j.created_at, started_at=j.started_at,
                   finished_at=j.finished_at, published=j.published_at is not None)


def _public_params(j: Job) -> dict[str, Any]:
    """A job's parameters as users see them: an ingest job's saved upload by its file
    name only (never the store's keys)."""
    if j.kind != "ingest":
        return j.params
    hidden = ("upload_key", "upload_folder", "keys_key", "labels_key")
    return {k: v for k, v in j.params.items() if k not in hidden}


class TrainingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "dataset_id": 1,
        "model": {"family": "mlp", "latent_dim": 8, "hidden": [256, 128],
                  "likelihood": "bernoulli", "beta": 1.0},
        "training": {"epochs": 20, "batch_size": 128, "lr": 0.001, "seed": 0,
                     "val_fraction": 0.1, "importance_samples": 100}}]})

    dataset_id: int = Field(ge=1, le=MAX_ID)
    model: dict[str, Any] = Field(description="models.config.VAEConfig fields (see README)")
    training: dict[str, Any] = Field(default_factory=dict,
                                     description="models.config.TrainConfig fields")
    registered_model: str | None = Field(
        None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_. -]*$",
        description="with the MLflow bridge: the registered model the trained model becomes "
                    "a version of (default: the dataset's name); letters, digits, '_', "
                    "'.', '-' and spaces, starting with a letter or digit, no '..'")

    @field_validator("registered_model")
    @classmethod
    def _no_parent_path(cls, value: str | None) -> str | None:
        if value is not None and ".." in value:  # MLflow refuses a name like a path
            raise ValueError("registered_model may not contain '..'")
        return value


class SweepRequest(TrainingRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "dataset_id": 1, "model": {"family": "mlp", "latent_dim": 8},
        "training": {"epochs": 10}, "grid": {"model.latent_dim": [2, 8], "model.beta": [1, 4]}}]})

    grid: dict[str, list[Any]] = Field(description="'model.<field>' or 'training.<field>' "
                                                   "to the values to try")


class SweepOut(BaseModel):
    sweep_id: str
    jobs: list[JobOut]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model_id": 1, "dataset_id": 1, "importance_samples": 100}]})

    model_id: Ref
    dataset_id: int = Field(ge=1, le=MAX_ID)
    importance_samples: int | None = Field(
        None, ge=0, le=100_000, description="0 (the default): ELBO terms only; K > 0: also "
                                            "log p(x). An append takes the set's K")
    embedding_set_id: Ref | None = Field(
        None, description="append the dataset's items to this ready set of the same model "
                          "(keys must stay unique in the set: 409 naming clashes)")
    vector_type: Literal["vector", "halfvec"] | None = Field(
        None, description="how the set stores its latents: 'vector' (float32) or 'halfvec' "
                          "(float16: half the disk a row's codes take, values to about three "
                          "significant digits, |x| <= 65504); searches, exports and the SQL "
                          "views answer float32 either way. Default: the "
                          "default_vector_type setting; an append takes the set's")
