"""Serving a model: decode, sample, interpolate, traverse, encode and score."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.common import Ref


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"z": [[0.0, 0.5, -1.0, 0.2, 0.0, 0.1, 0.3, -0.4]]}]})

    z: list[list[float]] | list[float]


class ArrayOut(BaseModel):
    x: list[Any] = Field(description="the decoder's mean, one item per row, item-shaped")


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"n": 16, "seed": 0, "temperature": 1.0}]})

    n: int = Field(16, ge=1, le=4096)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    temperature: float = Field(1.0, gt=0, le=10)


class SampleOut(ArrayOut):
    z: list[list[float]]


class InterpolateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"embedding_id": 1, "from_key": "0", "to_key": "42", "steps": 8,
         "method": "slerp"}]})

    z_from: list[float] | None = Field(None, max_length=65536)
    z_to: list[float] | None = Field(None, max_length=65536)
    embedding_id: Ref | None = Field(None)
    from_key: str | None = Field(None, max_length=1000)
    to_key: str | None = Field(None, max_length=1000)
    steps: int = Field(8, ge=2, le=256)
    method: Literal["linear", "slerp"] = "linear"


class TraverseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"embedding_id": 1, "key": "42", "top": 4, "steps": 9, "span": 3.0}]})

    z: list[float] | None = Field(None, max_length=65536,
                                  description="the base point (default: the prior mean, 0)")
    embedding_id: Ref | None = Field(None,
                                     description="with 'key': the base is that item's mu")
    key: str | None = Field(None, max_length=1000)
    dims: list[int] | None = Field(None, min_length=1, max_length=256,
                                   description="the dimensions to move (default: 'top')")
    top: int = Field(8, ge=1, le=256, description="the dimensions with the most held-out KL")
    steps: int = Field(9, ge=2, le=64)
    span: float = Field(3.0, gt=0, le=100, description="each dimension moves from base - span "
                                                       "to base + span (prior units)")


class TraverseOut(SampleOut):
    dims: list[int] = Field(description="one row of the grid each, most held-out KL first")
    kl: list[float | None] = Field(description="each dimension's held-out KL (nats)")
    offsets: list[float] = Field(description="one column each: added to the base's value")


class EncodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"x": [[0.0] * 64]}]})

    x: list[Any] = Field(description="items, each of the model's item shape or flat")


class EncodeOut(BaseModel):
    mu: list[list[float]]
    logvar: list[list[float]]


class ScoreThreshold(BaseModel):
    fpr: float = Field(description="the false-positive rate asked for")
    value: float = Field(description="items whose statistic lies below it are outliers")
    statistic: Literal["log_px", "elbo"] = Field(
        description="what it bounds: log p(x) (with the held-out K) or, for a model "
                    "evaluated without importance samples, the ELBO")
    importance_samples: int = Field(description="K of the held-out figures it was taken from "
                                                "(with fpr, /score takes no other K)")
    heldout_items: int = Field(description="held-out items it was calibrated on")
    split: Literal["validation", "training"] = Field(
        description="where those items came from: the validation split, or the training "
                    "rows of a model trained with val_fraction = 0 (items the model has seen "
                    "score higher than new ones, so more than fpr are flagged)")
    note: str | None = Field(None, description="what to know about this threshold")


class ScoreOut(BaseModel):
    n_items: int
    importance_samples: int = Field(description="K: log p(x) and the ELBO terms average "
                                                "max(1, K) posterior draws")
    elbo: list[float] = Field(description="per item, nats (higher is better)")
    reconstruction: list[float]
    kl: list[float] = Field(description="closed form: no Monte-Carlo error")
    elbo_se: list[float] | None = Field(
        None, description="Monte-Carlo standard error of the ELBO (with K >= 2)")
    log_px: list[float] | None = Field(None, description="importance-sampled (K > 0)")
    log_px_se: list[float] | None = Field(
        None, description="its Monte-Carlo standard error, from the importance weights")
    ess: list[float] | None = Field(
        None, description="effective sample size of the importance weights (1 to K)")
    likelihood_kind: Literal["discrete", "density", "unnormalised"] = Field(
        description="which figure log p(x) and the ELBO are: 'discrete' (log-probability of "
                    "binary, binarised, dequantised integer or discretised-logistic "
                    "8-bit data; bits/dim apply), "
                    "'density' (of continuous data), 'unnormalised' (a Bernoulli decoder on "
                    "grey items: no likelihood)")
    bits_per_dim: list[float] | None = Field(
        None, description="-log p(x) / (D ln 2) (the ELBO's when K = 0): 'discrete' only")
    logits_source: Literal["exported", "recovered", "floored"] | None = Field(
        None, description="(continuous) Bernoulli decoders: 'exported', the decoder file's "
                          "own logits (the figures match torch's for any logit); "
                          "'recovered', a continuous-Bernoulli file exported before logits "
                          "were: each logit l is solved from the exported mean, within "
                          "about 3e-8 l^2; 'floored', a Bernoulli file exported before "
                          "logits were: probabilities are floored at 2^-24, so a value the "
                          "decoder is surer of than |l| = 16.6 counts at most 16.6 nats "
                          "(export the model again for exact figures). None: Gaussian")
    threshold: ScoreThreshold | None = None
    is_outlier: list[bool] | None = None
