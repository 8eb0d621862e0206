"""The training job: claim, resume from the last checkpoint, train with per-epoch metric
rows and checkpoints, evaluate held-out log p(x), export ONNX, register the model."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from sqlalchemy import text, update

from models.checkpoint import CheckpointError, load_checkpoint
from models.config import ConfigError, TrainConfig, VAEConfig
from models.data import DataError
from models.trainer import Callback, Progress, Trainer, TrainingCancelled
from store.datasets import dataset_array, get_dataset
from store.errors import StoreError
from store.jobs import LeaseLost, claim, finish, lease_guard
from store.tables import Model
from workers.context import Context
from workers.lease import Lease, new_owner
from workers.pipeline import train_evaluate_export

log = logging.getLogger(__name__)
TRAIN_SHARE = 0.9  # of the job's progress; held-out evaluation and export are the rest
METRIC_COLUMNS = ("elbo", "reconstruction", "kl", "log_px", "importance_samples", "loss",
                  "beta", "lr", "active_units", "seconds")


def checkpoint_key(model_id: int) -> str:
    return f"models/{model_id}/checkpoint.safetensors"


class JobCallback(Callback):
    """Bridges the trainer to the job row: progress, metrics, checkpoints, cancellation."""

    def __init__(self, ctx: Context, lease: Lease, job_id: int, model_id: int,
                 local_checkpoint: str) -> None:
        self.ctx, self.lease, self.job_id, self.model_id = ctx, lease, job_id, model_id
        self.local_checkpoint = local_checkpoint
        self.last_val = ""  # the latest validation figures, carried in every progress message

    def on_progress(self, trainer: Trainer, progress: Progress) -> None:
        self.lease.report(TRAIN_SHARE * progress.fraction,
                          f"epoch {progress.epoch}/{progress.epochs}{self.last_val}",
                          progress.eta_seconds)

    def on_epoch_end(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        # The checkpoint first: a crash between the two re-runs this epoch, which writes
        # the same rows again (upserts of identical values: training is deterministic).
        self.ctx.artifacts.put_file(self.local_checkpoint, checkpoint_key(self.model_id))
        write_metrics(self.ctx, self.job_id, self.lease.owner, self.model_id, rows)
        val = [r for r in rows if r["split"] == "val"]
        if val:
            self.last_val = f" · val ELBO {val[0]['elbo']:.2f}"
            if val[0]["log_px"] is not None:
                self.last_val += f" · log p(x) {val[0]['log_px']:.2f}"
            self.last_val += f" (epoch {trainer.epoch})"

    def should_cancel(self) -> bool:
        return self.lease.cancelled


def write_metrics(ctx: Context, job_id: int, owner: str, model_id: int,
                  rows: list[dict[str, Any]]) -> None:
    """Upsert one row per (model, epoch, split), only while this attempt holds the lease."""
    cols = ", ".join(METRIC_COLUMNS)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in METRIC_COLUMNS)
    sql = text(f"INSERT INTO training_metrics (model_id, epoch, split, {cols}) VALUES "
               f"(:model_id, :epoch, :split, {', '.join(':' + c for c in METRIC_COLUMNS)}) "
               f"ON CONFLICT (model_id, epoch, split) DO UPDATE SET {updates}")
    with ctx.db.engine.begin() as conn:
        lease_guard(conn, job_id, owner)
        conn.execute(sql, [{"model_id": model_id, **{k: r.get(k) for k in
                                                      ("epoch", "split", *METRIC_COLUMNS)}}
                           for r in rows])


def set_model(ctx: Context, model_id: int, **values: Any) -> None:
    with ctx.db.session() as s:
        s.execute(update(Model).where(Model.id == model_id)
                  .values(updated_at=text("now()"), **values))


def run_training_job(ctx: Context, job_id: int) -> dict[str, Any]:
    owner = new_owner()
    settings = ctx.settings
    got = claim(ctx.db, job_id, owner, settings.job_lease_seconds)
    if got.outcome != "claimed":
        log.info("training delivery skipped job_id=%d outcome=%s", job_id, got.outcome)
        return {"outcome": got.outcome}
    job = got.job
    assert job is not None and job.model_id is not None
    model_id = job.model_id
    log.info("training started job_id=%d model_id=%d attempt=%d", job_id, model_id,
             job.attempts)
    with Lease(ctx.db, job_id, owner, settings.job_lease_seconds) as lease, \
            tempfile.TemporaryDirectory(prefix=f"train-{job_id}-") as tmp:
        try:
            params = job.params
            dataset = get_dataset(ctx.db, params["dataset_id"])
            model_cfg = VAEConfig.from_dict(params["model"])
            train_cfg = TrainConfig.from_dict(params["training"])
            data = dataset_array(ctx.artifacts, dataset, str(settings.cache_dir))
            set_model(ctx, model_id, status="training")
            resume = None
            if ctx.artifacts.exists(checkpoint_key(model_id)):
                local = os.path.join(tmp, "resume.safetensors")
                ctx.artifacts.get_file(checkpoint_key(model_id), local)
                resume = load_checkpoint(local)
                log.info("resuming job_id=%d from epoch %d", job_id, resume.progress["epoch"])
                # The checkpoint's epochs may be newer than the metric rows (a crash
                # between the upload and the insert): write its history again.
                write_metrics(ctx, job_id, owner, model_id, resume.history)
                lease.report(TRAIN_SHARE * resume.progress["epoch"] / train_cfg.epochs,
                             f"resuming after epoch {resume.progress['epoch']}")
            callback = JobCallback(ctx, lease, job_id, model_id,
                                   os.path.join(tmp, "checkpoint.safetensors"))
            result = train_evaluate_export(data, model_cfg, train_cfg, tmp, [callback], resume)
            lease.check()
            lease.report(0.97, "uploading the ONNX files")
            uris = {}
            for role, exported in result.onnx.items():
                key = f"models/{model_id}/{role}.onnx"
                ctx.artifacts.put_file(exported.path, key)
                uris[role] = (ctx.artifacts.uri(key), exported.sha256)
            lease.check()
            set_model(ctx, model_id, status="ready", summary=result.summary,
                      checkpoint_uri=ctx.artifacts.uri(checkpoint_key(model_id)),
                      encoder_uri=uris["encoder"][0], encoder_sha256=uris["encoder"][1],
                      decoder_uri=uris["decoder"][0], decoder_sha256=uris["decoder"][1])
            finish(ctx.db, job_id, owner, "succeeded", message="model ready")
            log.info("training succeeded job_id=%d model_id=%d heldout_log_px=%s", job_id,
                     model_id, result.summary.get("heldout_log_px"))
            return {"outcome": "succeeded", "model_id": model_id}
        except LeaseLost:
            log.warning("training attempt lost its lease job_id=%d owner=%s", job_id, owner)
            return {"outcome": "lease_lost"}
        except TrainingCancelled:
            if lease.lost:
                return {"outcome": "lease_lost"}
            set_model(ctx, model_id, status="cancelled")
            finish(ctx.db, job_id, owner, "cancelled",
                   message="cancelled; the last checkpoint is kept")
            return {"outcome": "cancelled"}
        except (ConfigError, DataError, CheckpointError, StoreError) as exc:
            set_model(ctx, model_id, status="failed")
            finish(ctx.db, job_id, owner, "failed", error=str(exc))
            return {"outcome": "failed"}
        except Exception as exc:
            log.exception("training failed job_id=%d", job_id)
            set_model(ctx, model_id, status="failed")
            finish(ctx.db, job_id, owner, "failed", error=f"{type(exc).__name__}: {exc}")
            return {"outcome": "failed"}
