"""The training loop: Adam on the (beta-)ELBO or the IWAE bound, with validation,
early stopping, progress, checkpoints and cancellation through callbacks.

Determinism: every random draw of epoch e (shuffle order, reparameterization noise,
validation noise) comes from generators seeded by (seed, e), and a checkpoint holds
weights, Adam's state and the early-stopping state at an epoch boundary. So on CPU,
resuming from the checkpoint after epoch e reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from models.config import ConfigError, TrainConfig, VAEConfig
from models.data import iter_batches, split_indices, validate_array
from models.evaluate import collapse_warning, evaluate
from models.networks import set_output_bias
from models.schedule import learning_rate
from models.transforms import training_seed
from models.vae import VAE, beta_elbo_loss, elbo_terms, iwae_bound

log = logging.getLogger(__name__)


class TrainingCancelled(Exception):
    """Raised by `Trainer.fit` when a callback asked to stop; the last checkpoint stays."""


@dataclass(frozen=True)
class Progress:
    """Where training stands: `fraction` of all optimiser steps done, and an ETA."""

    fraction: float
    epoch: int  # 1-based epoch in progress
    epochs: int
    step: int
    total_steps: int
    eta_seconds: float | None
    message: str


class Callback:
    """Hooks into `Trainer.fit`; every method is optional."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_progress(self, trainer: Trainer, progress: Progress) -> None: ...

    def on_epoch_end(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None: ...

    def should_cancel(self) -> bool:
        """Checked once per batch; True stops training with TrainingCancelled."""
        return False


class CheckpointEachEpoch(Callback):
    """Writes `trainer.checkpoint()` to `path` after every epoch (atomically)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sha256: str | None = None

    def on_epoch_end(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        self.sha256 = save_checkpoint(self.path, trainer.checkpoint())


@dataclass
class TrainResult:
    model: VAE
    history: list[dict[str, Any]]
    epochs_run: int
    best_epoch: int | None
    stopped_early: bool
    train_rows: np.ndarray
    val_rows: np.ndarray
    device: str
    seconds: float
    data_binary: bool = False  # every training value was 0 or 1
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one (seed, epoch, stream) triple."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


class Trainer:
    """Trains one VAE. `fit` may be called once per Trainer."""

    def __init__(self, model_config: VAEConfig, train_config: TrainConfig,
                 callbacks: Sequence[Callback] = (), progress_interval: float = 1.0) -> None:
        self.model_config = model_config
        self.config = train_config
        self.callbacks = list(callbacks)
        self.progress_interval = progress_interval
        self.device = resolve_device(train_config.device)
        self.amp_dtype = self._amp_dtype()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train_config.seed)
            self.model = VAE(model_config)
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=train_config.lr, eps=train_config.adam_eps,
            betas=(train_config.adam_beta1, train_config.adam_beta2),
            weight_decay=train_config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epoch = 0  # completed epochs
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best_val_elbo = -math.inf
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0

    def _amp_dtype(self) -> torch.dtype | None:
        if not self.config.mixed_precision:
            return None
        if self.device.type != "cuda":
            log.info("mixed precision needs CUDA; training in float32 on %s", self.device)
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    # -- checkpoints -------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        """The state after the last completed epoch, enough to resume exactly."""
        return Checkpoint(
            model_config=self.model_config,
            model_state=self.model.state_dict(),
            train_config=self.config,
            optimizer_state=self.optimizer.state_dict(),
            best_state=self.best_state,
            progress={"epoch": self.epoch, "step": self.step,
                      "best_val_elbo": (self.best_val_elbo if math.isfinite(self.best_val_elbo)
                                        else None),
                      "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                      "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None},
            history=list(self.history),
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from `checkpoint`, which must come from the same configs."""
        if checkpoint.model_config != self.model_config:
            raise CheckpointError("checkpoint was written for a different model config")
        if checkpoint.train_config is not None and checkpoint.train_config.to_dict() != {
                **self.config.to_dict(), "epochs": checkpoint.train_config.epochs}:
            raise CheckpointError("checkpoint was written with different training settings "
                                  "(only 'epochs' may change on resume)")
        self.model.load_state_dict(checkpoint.model_state)
        if checkpoint.optimizer_state is not None:
            self.optimizer.load_state_dict(checkpoint.optimizer_state)
        p = checkpoint.progress
        self.epoch, self.step = int(p.get("epoch", 0)), int(p.get("step", 0))
        best = p.get("best_val_elbo")
        self.best_val_elbo = -math.inf if best is None else float(best)
        self.best_epoch = p.get("best_epoch")
        self.bad_epochs = int(p.get("bad_epochs", 0))
        self.best_state = checkpoint.best_state
        if p.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(p["scaler"])
        self.history = list(checkpoint.history)

    # -- the loop ----------------------------------------------------------------------

    def fit(self, data: np.ndarray, resume: Checkpoint | None = None) -> TrainResult:
        """Train on `data` (N, *input_shape), an array or a read-only memory map."""
        cfg = self.config
        stats = validate_array(data, self.model_config)
        train_rows, val_rows = split_indices(len(data), cfg.val_fraction, cfg.seed)
        if resume is not None:
            self.restore(resume)
        elif cfg.init_from_data and self.epoch == 0:
            self._init_from_data(data, train_rows)
        steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
        total_steps = steps_per_epoch * cfg.epochs
        warmup_steps = cfg.kl_warmup_epochs * steps_per_epoch
        for cb in self.callbacks:
            cb.on_train_start(self)
        log.info("training started device=%s train_items=%d val_items=%d epochs=%d "
                 "resume_epoch=%d", self.device, len(train_rows), len(val_rows), cfg.epochs,
                 self.epoch)
        started = time.perf_counter()
        start_step = self.step
        last_report = -math.inf
        stopped_early = False
        self.model.train()
        while self.epoch < cfg.epochs and not stopped_early:
            epoch_started = time.perf_counter()
            # loss, reconstruction, kl summed over items; kept on the device so a GPU step
            # never waits for the host.
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)
            rng = np.random.default_rng(_epoch_seed(cfg.seed, self.epoch, 0))
            noise = torch.Generator(device=self.device).manual_seed(
                _epoch_seed(cfg.seed, self.epoch, 1))
            noise_seed = training_seed(self.model_config, cfg.seed, self.epoch)
            for x in self._device_batches(data, train_rows, rng, noise_seed):
                if any(cb.should_cancel() for cb in self.callbacks):
                    raise TrainingCancelled(f"cancelled during epoch {self.epoch + 1}")
                beta = self._beta(warmup_steps)
                self._set_lr(total_steps)
                _, terms = self._train_step(x, beta, noise)
                sums += terms  # loss * n, reconstruction, kl: one add per step
                self.step += 1
                now = time.perf_counter()
                if now - last_report >= self.progress_interval:
                    last_report = now
                    self._check_finite(sums)
                    self._report(start_step, total_steps, started, now, "training")
            stopped_early = self._end_epoch(data, sums, len(train_rows), val_rows, beta,
                                            epoch_started)
            self._report(start_step, total_steps, started, time.perf_counter(),
                         f"epoch {self.epoch}/{cfg.epochs} done" + collapse_warning(
                             self.history[-1]["active_units"], self.model_config.latent_dim))
        if stopped_early and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        return TrainResult(self.model, self.history, self.epoch, self.best_epoch, stopped_early,
                           train_rows, val_rows, str(self.device),
                           time.perf_counter() - started, data_binary=stats.binary)

    def _end_epoch(self, data: np.ndarray, sums: torch.Tensor, n_train: int,
                   val_rows: np.ndarray, beta: float, epoch_started: float) -> bool:
        """The epoch's rows (training, and validation when there is a split) into the
        history and to the callbacks; True when early stopping says stop."""
        self._check_finite(sums)
        self.epoch += 1
        stop = False
        rows = [self._train_row(sums, n_train, beta, epoch_started)]
        if len(val_rows):
            rows.append(self._validate(data, val_rows))
            stop = self._early_stopping(rows[-1]["elbo"])
        self.history.extend(rows)
        log.info("epoch done epoch=%d %s", self.epoch,
                 " ".join(f"{r['split']}_elbo={r['elbo']:.3f}" for r in rows))
        for cb in self.callbacks:
            cb.on_epoch_end(self, rows)
        return stop

    def _init_from_data(self, data: np.ndarray, rows: np.ndarray) -> None:
        """The decoder's output starts at the training items' mean (models.networks
        .set_output_bias), read in batches as the model sees them (float64 sums)."""
        total = torch.zeros(self.model_config.input_shape, dtype=torch.float64)
        squares = torch.zeros_like(total)
        for x in iter_batches(data, rows, max(self.config.eval_batch_size, 1024),
                              self.model_config):
            x64 = x.double()
            total += x64.sum(0)
            squares += x64.square().sum(0)
        mean = total / len(rows)
        std = (squares / len(rows) - mean.square()).clamp(min=0).sqrt()
        loc = self.model.likelihood.location_of(mean.float(), std.float())
        set_output_bias(self.model.decoder, loc)
        self.model.to(self.device)

    def _device_batches(self, data: np.ndarray, rows: np.ndarray, rng: np.random.Generator,
                        noise_seed: int | None) -> Iterator[torch.Tensor]:
        pin = self.device.type == "cuda"
        for x in iter_batches(data, rows, self.config.batch_size, self.model_config, rng,
                              noise_seed):
            yield (x.pin_memory() if pin else x).to(self.device, non_blocking=pin)

    def _set_lr(self, total_steps: int) -> None:
        """The schedule's learning rate for the step about to run (a function of the epoch
        and step count only, so resuming restores it)."""
        if self.config.lr_schedule == "constant":
            return
        lr = learning_rate(self.config, self.epoch, self.step, total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _beta(self, warmup_steps: int) -> float:
        if warmup_steps <= 0:
            return self.model_config.beta
        return self.model_config.beta * min(1.0, (self.step + 1) / warmup_steps)

    def _train_step(self, x: torch.Tensor, beta: float, noise: torch.Generator,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; returns the loss and the batch sums (loss * n, rec, KL)."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            if cfg.objective == "iwae":
                bound = iwae_bound(self.model, x, cfg.iwae_samples, noise)
                loss = -bound.mean()
                with torch.no_grad():
                    terms = elbo_terms(self.model, x, 1, noise)
            else:
                terms = elbo_terms(self.model, x, cfg.elbo_samples, noise)
                loss = beta_elbo_loss(terms, beta, cfg.free_bits)
        if self.scaler.is_enabled():  # fp16 on CUDA: scaled loss, unscaled gradients
            self.scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                self._clip_gradients(cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if cfg.grad_clip is not None:
                self._clip_gradients(cfg.grad_clip)
            self.optimizer.step()
        with torch.no_grad():
            sums = torch.stack([loss * len(x), terms.reconstruction.sum(), terms.kl.sum()])
        return loss, sums

    def _clip_gradients(self, max_norm: float) -> None:
        """Scale gradients to a global norm of at most `max_norm`.

        On CUDA, torch's `clip_grad_norm_` (it always multiplies, so it never waits for
        the device). On CPU waiting is free, so gradients are multiplied only when the
        coefficient is below 1: the same numbers, without a pass over every gradient on
        most steps (~10 % of an MLP step here).
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.device.type != "cpu":
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        if max_norm / (float(total) + 1e-6) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)

    def _check_finite(self, sums: torch.Tensor) -> None:
        if not bool(torch.isfinite(sums).all()):
            raise FloatingPointError(f"training diverged (non-finite loss) by step {self.step} "
                                     f"of epoch {self.epoch + 1}; lower lr or set grad_clip")

    def _train_row(self, sums: torch.Tensor, n: int, beta: float,
                   started: float) -> dict[str, Any]:
        loss, rec, kl = (float(v) / n for v in sums)
        elbo = rec - kl
        return {"epoch": self.epoch, "split": "train", "loss": loss, "elbo": elbo,
                "reconstruction": rec, "kl": kl, "log_px": None, "log_px_se": None,
                "ess": None, "importance_samples": 0,
                "beta": beta, "lr": self.optimizer.param_groups[0]["lr"],
                "active_units": None, "seconds": time.perf_counter() - started}

    def _validate(self, data: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
        started = time.perf_counter()
        k = self.config.eval_importance_samples
        result = evaluate(self.model, data, rows, importance_samples=k,
                          batch_size=self.config.eval_batch_size,
                          seed=_epoch_seed(self.config.seed, self.epoch, 2), device=self.device)
        s = result.summary()
        return {"epoch": self.epoch, "split": "val", "loss": None, "elbo": s["elbo"],
                "reconstruction": s["reconstruction"], "kl": s["kl"], "log_px": s["log_px"],
                "log_px_se": s["log_px_se"], "ess": s["ess_mean"],
                "importance_samples": k, "beta": 1.0,
                "lr": self.optimizer.param_groups[0]["lr"],
                "active_units": s["active_units"], "seconds": time.perf_counter() - started}

    def _early_stopping(self, val_elbo: float) -> bool:
        if val_elbo > self.best_val_elbo + self.config.min_delta:
            self.best_val_elbo, self.best_epoch, self.bad_epochs = val_elbo, self.epoch, 0
            if self.config.early_stopping_patience is not None:
                self.best_state = {k: v.detach().clone() for k, v in
                                   self.model.state_dict().items()}
            return False
        self.bad_epochs += 1
        patience = self.config.early_stopping_patience
        return patience is not None and self.bad_epochs >= patience

    def _report(self, start_step: int, total_steps: int, started: float, now: float,
                message: str) -> None:
        done = self.step - start_step
        remaining = total_steps - self.step
        eta = (now - started) / done * remaining if done else None
        progress = Progress(fraction=min(1.0, self.step / total_steps),
                            epoch=min(self.epoch + 1, self.config.epochs),
                            epochs=self.config.epochs, step=self.step, total_steps=total_steps,
                            eta_seconds=eta, message=message)
        for cb in self.callbacks:
            cb.on_progress(self, progress)
