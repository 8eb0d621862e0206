"""The training job: claim, resume from the last checkpoint, train with per-epoch metric
rows and checkpoints, evaluate held-out log p(x), export ONNX and register the model, every
record written only while the attempt holds the job's lease (docs/internals/workers.md)."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from models.checkpoint import CheckpointError, load_checkpoint
from models.config import ConfigError, TrainConfig, VAEConfig
from models.data import DataError
from models.pipeline import train_evaluate_export
from models.trainer import Callback, Progress, Trainer, TrainingCancelled, collapse_warning
from store.artifacts import model_key
from store.datasets import dataset_array, get_dataset
from store.db import is_transient
from store.errors import StoreError
from store.jobs import LeaseLost, finish, record_epochs
from store.registry import get_model
from workers.context import Context
from workers.lease import Lease, start_attempt
from workers.outages import end_for, retry_while_leased

log = logging.getLogger(__name__)
TRAIN_SHARE = 0.9  # of the job's progress; held-out evaluation and export are the rest
OWN_ERRORS = (ConfigError, DataError, CheckpointError, StoreError)  # bad data or config


class JobCallback(Callback):
    """Bridges the trainer to the job row: progress, metrics, checkpoints, cancellation."""

    def __init__(self, ctx: Context, lease: Lease, job_id: int, model_id: int, attempt: int,
                 local_checkpoint: str) -> None:
        self.ctx, self.lease, self.job_id, self.model_id = ctx, lease, job_id, model_id
        self.checkpoint_key = model_key(model_id, attempt, "checkpoint.safetensors")
        self.local_checkpoint = local_checkpoint
        self.last_val = ""  # the latest validation figures, carried in every progress message

    def on_progress(self, trainer: Trainer, progress: Progress) -> None:
        self.lease.report(TRAIN_SHARE * progress.fraction,
                          f"epoch {progress.epoch}/{progress.epochs}{self.last_val}",
                          progress.eta_seconds)

    def on_epoch_end(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        # The checkpoint file first (this attempt's own), then, in one guarded
        # transaction, the epoch's metric rows and the pointer to that checkpoint.
        self.lease.confirm()
        self.ctx.artifacts.put_file(self.local_checkpoint, self.checkpoint_key)
        uri = self.ctx.artifacts.uri(self.checkpoint_key)
        retry_while_leased(lambda: record_epochs(self.ctx.db, self.job_id, self.lease.owner,
                                              self.model_id, rows, uri),
                        self.lease, f"metrics of job {self.job_id}")
        val = [r for r in rows if r["split"] == "val"]
        if val:
            self.last_val = f" · val ELBO {val[0]['elbo']:.2f}"
            if val[0]["log_px"] is not None:
                self.last_val += f" · log p(x) {val[0]['log_px']:.2f}"
                if val[0].get("log_px_se") is not None:
                    self.last_val += f" ± {val[0]['log_px_se']:.2f}"
            self.last_val += f" (epoch {trainer.epoch})" + collapse_warning(
                val[0].get("active_units"), trainer.model_config.latent_dim)

    def should_cancel(self) -> bool:
        return self.lease.cancelled


def run_training_job(ctx: Context, job_id: int) -> dict[str, Any]:
    settings = ctx.settings
    owner, got = start_attempt(ctx.db, job_id, settings.job_lease_seconds)
    if got.outcome != "claimed":
        return {"outcome": got.outcome}
    job = got.job
    assert job is not None and job.model_id is not None
    model_id = job.model_id
    log.info("training started job_id=%d model_id=%d attempt=%d", job_id, model_id,
             job.attempts)
    with Lease(ctx.db, job_id, owner, settings.job_lease_seconds) as lease, \
            tempfile.TemporaryDirectory(prefix=f"train-{job_id}-") as tmp:
        try:
            return _train(ctx, job_id, job.params, model_id, job.attempts, lease, tmp)
        except LeaseLost:
            log.warning("training attempt lost its lease job_id=%d owner=%s", job_id, owner)
            return {"outcome": "lease_lost"}
        except TrainingCancelled:
            if lease.lost:
                return {"outcome": "lease_lost"}
            finish(ctx.db, job_id, owner, "cancelled",
                   message="cancelled; the last checkpoint is kept")
            return {"outcome": "cancelled"}
        except Exception as exc:
            own = isinstance(exc, OWN_ERRORS)  # the job's own: its message says it all
            if not own and not is_transient(exc):
                log.exception("training failed job_id=%d", job_id)
            return end_for(ctx, job_id, owner, exc, str(exc) if own else None)


def _train(ctx: Context, job_id: int, params: dict[str, Any], model_id: int, attempt: int,
           lease: Lease, tmp: str) -> dict[str, Any]:
    dataset = get_dataset(ctx.db, params["dataset_id"])
    model_cfg = VAEConfig.from_dict(params["model"])
    train_cfg = TrainConfig.from_dict(params["training"])
    data = dataset_array(ctx.artifacts, dataset, str(ctx.settings.cache_dir))
    resume = None
    previous = get_model(ctx.db, model_id).checkpoint_uri
    if previous:
        local = os.path.join(tmp, "resume.safetensors")
        ctx.artifacts.get_file(ctx.artifacts.key_of(previous), local)
        resume = load_checkpoint(local)
        log.info("resuming job_id=%d from epoch %d", job_id, resume.progress["epoch"])
        # An attempt overwrites its checkpoint file each epoch before it records the
        # epoch, so the file can be one epoch ahead of the rows (killed in between):
        # record the checkpoint's own history again (upserts of the same values).
        retry_while_leased(lambda: record_epochs(ctx.db, job_id, lease.owner, model_id,
                                              resume.history), lease, f"resume of {job_id}")
        lease.report(TRAIN_SHARE * resume.progress["epoch"] / train_cfg.epochs,
                     f"resuming after epoch {resume.progress['epoch']}")
    callback = JobCallback(ctx, lease, job_id, model_id, attempt,
                           os.path.join(tmp, "checkpoint.safetensors"))
    result = train_evaluate_export(data, model_cfg, train_cfg, tmp, [callback], resume)
    lease.report(0.97, "uploading the ONNX files")
    lease.confirm()
    uris = {}
    for role, exported in result.onnx.items():
        key = model_key(model_id, attempt, f"{role}.onnx")
        ctx.artifacts.put_file(exported.path, key)
        uris[role] = (ctx.artifacts.uri(key), exported.sha256)
    retry_while_leased(lambda: finish(
        ctx.db, job_id, lease.owner, "succeeded", message=ready_message(result.summary),
        model={
            "summary": result.summary,
            "encoder_uri": uris["encoder"][0], "encoder_sha256": uris["encoder"][1],
            "decoder_uri": uris["decoder"][0], "decoder_sha256": uris["decoder"][1]}),
        lease, f"finish of job {job_id}")
    log.info("training succeeded job_id=%d model_id=%d heldout_log_px=%s", job_id, model_id,
             result.summary.get("heldout_log_px"))
    return {"outcome": "succeeded", "model_id": model_id}


def ready_message(summary: dict[str, Any]) -> str:
    """The finished job's message: ready, with the collapse warning and a note when the
    figures are no normalised likelihood."""
    message = "model ready"
    warning = (summary.get("collapse") or {}).get("warning")
    if warning:
        message += f"; warning: {warning}"
    if summary.get("likelihood_kind") == "unnormalised":
        message += ("; note: a Bernoulli decoder on grey data, so log p(x) is not a "
                    "normalised likelihood (binarize or continuous_bernoulli makes it one)")
    return message
