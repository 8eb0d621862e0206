"""Train -> evaluate held-out -> export ONNX, on a local array: no database, no broker.

This is the body of a training job; `workers.training` wraps it with the job's lease,
artifact uploads and metric rows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.checkpoint import Checkpoint
from models.config import TrainConfig, VAEConfig
from models.evaluate import COLLAPSE_WARNING_SHARE, CONVERGENCE_K, Evaluation, evaluate
from models.export import ExportedModel, export_vae
from models.trainer import Callback, CheckpointEachEpoch, Trainer, TrainResult

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    train: TrainResult
    heldout: Evaluation
    onnx: dict[str, ExportedModel]
    checkpoint_path: str
    summary: dict[str, Any]


LIKELIHOOD_NOTES = {
    "discrete": "log-probabilities (nats) of discrete data (binary, binarised, 8-bit data "
                "under the discretised logistic, or integer data under uniform "
                "dequantisation: a lower bound); bits/dim apply",
    "density": "log-densities (nats) of continuous data: comparable between models of the "
               "same data, not with discrete likelihoods or bits/dim tables",
    "unnormalised": "NOT a normalised likelihood: a Bernoulli decoder on data that is not "
                    "binary (x log p + (1 - x) log(1 - p) for grey x); comparable with "
                    "nothing published. Use binarize 'static'/'dynamic' or the "
                    "continuous_bernoulli likelihood",
}


def collapse_report(heldout: Evaluation, latent_dim: int) -> dict[str, Any]:
    """Which latent dimensions collapsed to the prior on the held-out split, and a warning
    naming the knobs when most did."""
    dims = heldout.collapsed_dims
    warning = None
    if len(dims) > COLLAPSE_WARNING_SHARE * latent_dim:
        warning = (f"{len(dims)} of {latent_dim} latent dimensions collapsed (posterior = "
                   "prior): try KL warm-up (training.kl_warmup_epochs), free bits "
                   "(training.free_bits), a smaller beta, or a smaller latent_dim")
    return {"collapsed_dims": dims, "n_collapsed": len(dims), "warning": warning}


def train_evaluate_export(data: np.ndarray, model_config: VAEConfig, train_config: TrainConfig,
                          out_dir: str, callbacks: Sequence[Callback] = (),
                          resume: Checkpoint | None = None) -> PipelineResult:
    """Train with a checkpoint each epoch, evaluate the validation split with K importance
    samples, export and verify encoder and decoder; write `summary.json` into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    checkpoint_path = os.path.join(out_dir, "checkpoint.safetensors")
    trainer = Trainer(model_config, train_config,
                      callbacks=[CheckpointEachEpoch(checkpoint_path), *callbacks])
    result = trainer.fit(data, resume=resume)
    started = time.perf_counter()
    rows = result.val_rows if len(result.val_rows) else result.train_rows
    heldout = evaluate(result.model, data, rows,
                       importance_samples=train_config.importance_samples,
                       batch_size=train_config.eval_batch_size, seed=train_config.seed,
                       device=result.device, at=CONVERGENCE_K)
    eval_seconds = time.perf_counter() - started
    onnx_files = export_vae(result.model, out_dir)
    n_train_samples = len(result.train_rows) * (result.epochs_run - (
        resume.progress.get("epoch", 0) if resume else 0))
    kind = model_config.likelihood_kind(result.data_binary)
    summary = {
        "architecture": model_config.architecture(),
        "heldout_split": "val" if len(result.val_rows) else "train",
        **{f"heldout_{k}": v for k, v in heldout.summary().items()},
        "likelihood_kind": kind,
        "likelihood_note": LIKELIHOOD_NOTES[kind],
        "kl_per_dim": heldout.kl_per_dim.tolist(),
        "collapse": collapse_report(heldout, model_config.latent_dim),
        "heldout_quantiles": heldout.quantiles(),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "device": result.device,
        "train_seconds": result.seconds,
        "train_samples_per_second": n_train_samples / max(result.seconds, 1e-9),
        "eval_seconds": eval_seconds,
        "onnx": {role: {"sha256": f.sha256, "max_abs_error": f.max_abs_error,
                        "outputs": list(f.output_names)} for role, f in onnx_files.items()},
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"summary": summary, "history": result.history,
                   "model": model_config.to_dict(), "training": train_config.to_dict()},
                  f, indent=2)
    return PipelineResult(result, heldout, onnx_files, checkpoint_path, summary)
