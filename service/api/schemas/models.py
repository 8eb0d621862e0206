"""Trained models and their per-epoch metrics."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, Field

from store.tables import Model


class ModelOut(BaseModel):
    id: int
    dataset_id: int
    status: str
    config: dict[str, Any]
    summary: dict[str, Any] | None = None
    sweep_id: str | None = None
    encoder_sha256: str | None = None
    decoder_sha256: str | None = None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(cls, m: Model) -> ModelOut:
        summary = m.summary
        if summary and "heldout_quantiles" in summary:
            # 2 x 1001 numbers that /score reads; a model's answer names a few thresholds
            quantiles = summary["heldout_quantiles"]
            levels, values = quantiles["levels"], quantiles["values"]
            summary = {k: v for k, v in summary.items() if k != "heldout_quantiles"} | {
                "heldout_thresholds": {
                    "statistic": quantiles["statistic"],
                    "importance_samples": quantiles["importance_samples"],
                    # val_fraction = 0: the "held-out" items are the training rows
                    "split": "training" if summary.get("heldout_split") == "train"
                    else "validation",
                    "by_fpr": {str(f): values[levels.index(f)]
                               for f in (0.001, 0.01, 0.05, 0.1) if f in levels}}}
        return cls(id=m.id, dataset_id=m.dataset_id, status=m.status, config=m.config,
                   summary=summary, sweep_id=m.sweep_id, encoder_sha256=m.encoder_sha256,
                   decoder_sha256=m.decoder_sha256, created_at=m.created_at,
                   updated_at=m.updated_at)


class MetricRow(BaseModel):
    epoch: int
    split: str
    elbo: float
    reconstruction: float
    kl: float
    log_px: float | None = None
    log_px_se: float | None = Field(
        None, description="Monte-Carlo standard error of the mean log p(x) over the split")
    ess: float | None = Field(None, description="the importance weights' mean effective "
                                                "sample size (1 to importance_samples)")
    importance_samples: int
    loss: float | None = None
    beta: float
    lr: float
    active_units: int | None = None
    seconds: float
