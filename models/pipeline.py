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
from models.evaluate import Evaluation, evaluate
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
                       device=result.device)
    eval_seconds = time.perf_counter() - started
    onnx_files = export_vae(result.model, out_dir)
    n_train_samples = len(result.train_rows) * (result.epochs_run - (
        resume.progress.get("epoch", 0) if resume else 0))
    summary = {
        "heldout_split": "val" if len(result.val_rows) else "train",
        **{f"heldout_{k}": v for k, v in heldout.summary().items()},
        "kl_per_dim": heldout.kl_per_dim.tolist(),
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
