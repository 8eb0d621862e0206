"""The trainer on real data (scikit-learn digits): learning, determinism, resume, callbacks."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.config import ConfigError, TrainConfig, VAEConfig
from models.data import load_digits_dataset, open_npy, split_indices
from models.evaluate import evaluate
from models.trainer import (
    Callback,
    CheckpointEachEpoch,
    Trainer,
    TrainingCancelled,
)
from models.vae import VAE

MLP = VAEConfig(input_shape=(1, 8, 8), latent_dim=8, hidden=(64, 32))
FAST = TrainConfig(epochs=4, batch_size=64, lr=2e-3, seed=3, eval_importance_samples=8,
                   importance_samples=0)


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits_dataset()
    return images, labels


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.mark.slow
def test_digits_training_raises_validation_elbo_well_above_start(digits):
    images, _ = digits
    cfg = dataclasses.replace(FAST, epochs=15)
    _, val_rows = split_indices(len(images), cfg.val_fraction, cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        untrained = VAE(MLP)
    start = evaluate(untrained, images, val_rows, importance_samples=0, elbo_samples=16)
    result = Trainer(MLP, cfg).fit(images)
    final = [r for r in result.history if r["split"] == "val"][-1]
    assert start.summary()["elbo"] < -40  # 64 pixels near log 2 nats each at the start
    assert final["elbo"] > start.summary()["elbo"] + 12, (start.summary(), final)
    # The per-epoch log p(x) estimate is an upper estimate of the same model's ELBO.
    assert final["log_px"] >= final["elbo"] - 0.05
    # Reported validation ELBO agrees with an independent re-evaluation of the final model.
    again = evaluate(result.model, images, val_rows, importance_samples=0, elbo_samples=64,
                     seed=123).summary()["elbo"]
    assert final["elbo"] == pytest.approx(again, abs=0.3)


@pytest.mark.slow
def test_same_seed_same_weights_and_metrics(digits):
    images, _ = digits
    a = Trainer(MLP, dataclasses.replace(FAST, epochs=2)).fit(images)
    b = Trainer(MLP, dataclasses.replace(FAST, epochs=2)).fit(images)
    assert_same_weights(a.model, b.model)
    assert without_seconds(a.history) == without_seconds(b.history)
    c = Trainer(MLP, dataclasses.replace(FAST, epochs=2, seed=4)).fit(images)
    assert not torch.equal(a.model.decoder.body[0].weight, c.model.decoder.body[0].weight)


class CancelAt(Callback):
    def __init__(self, epoch):
        self.epoch, self.trainer = epoch, None

    def on_train_start(self, trainer):
        self.trainer = trainer

    def should_cancel(self):
        return self.trainer.epoch >= self.epoch


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_resume_from_checkpoint_equals_uninterrupted_run_bit_for_bit(digits, tmp_path, objective):
    images, _ = digits
    cfg = dataclasses.replace(FAST, objective=objective, kl_warmup_epochs=2,
                              early_stopping_patience=10)
    full = Trainer(MLP, cfg).fit(images)

    path = str(tmp_path / "ckpt.safetensors")
    with pytest.raises(TrainingCancelled):
        Trainer(MLP, cfg, callbacks=[CheckpointEachEpoch(path), CancelAt(2)]).fit(images)
    checkpoint = load_checkpoint(path)
    assert checkpoint.progress["epoch"] == 2
    resumed = Trainer(MLP, cfg).fit(images, resume=checkpoint)

    assert_same_weights(full.model, resumed.model)
    assert without_seconds(full.history) == without_seconds(resumed.history)
    assert [(r["epoch"], r["split"]) for r in resumed.history] == [
        (e, s) for e in range(1, 5) for s in ("train", "val")]


def test_resume_refuses_changed_settings(digits, tmp_path):
    images, _ = digits
    path = str(tmp_path / "c.safetensors")
    Trainer(MLP, dataclasses.replace(FAST, epochs=1),
            callbacks=[CheckpointEachEpoch(path)]).fit(images)
    with pytest.raises(ValueError, match="different training settings"):
        Trainer(MLP, dataclasses.replace(FAST, lr=0.1)).fit(images, resume=load_checkpoint(path))
    # Only more epochs is allowed.
    Trainer(MLP, dataclasses.replace(FAST, epochs=2)).fit(images, resume=load_checkpoint(path))


def test_training_from_memory_map_equals_in_memory(digits, tmp_path):
    images, _ = digits
    np.save(tmp_path / "digits.npy", images)
    mapped = open_npy(tmp_path / "digits.npy")
    assert isinstance(mapped, np.memmap)
    cfg = dataclasses.replace(FAST, epochs=1)
    assert_same_weights(Trainer(MLP, cfg).fit(images).model, Trainer(MLP, cfg).fit(mapped).model)


def test_flat_items_fit_an_mlp_with_image_shape(digits):
    images, _ = digits
    cfg = dataclasses.replace(FAST, epochs=1)
    flat = images.reshape(len(images), 64)
    assert_same_weights(Trainer(MLP, cfg).fit(images).model, Trainer(MLP, cfg).fit(flat).model)


@pytest.mark.slow
def test_early_stopping_restores_best_weights(digits):
    images, _ = digits
    # min_delta so large that no epoch after the first counts as better.
    cfg = dataclasses.replace(FAST, epochs=5, early_stopping_patience=2, min_delta=1e6)
    result = Trainer(MLP, cfg).fit(images)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1
    one_epoch = Trainer(MLP, dataclasses.replace(cfg, epochs=1)).fit(images)
    assert_same_weights(result.model, one_epoch.model)


class Recorder(Callback):
    def __init__(self):
        self.progress, self.epochs = [], []

    def on_progress(self, trainer, progress):
        self.progress.append(progress)

    def on_epoch_end(self, trainer, rows):
        self.epochs.append(rows)


@pytest.mark.slow
def test_progress_and_epoch_callbacks(digits):
    images, _ = digits
    rec = Recorder()
    Trainer(MLP, dataclasses.replace(FAST, epochs=3), callbacks=[rec],
            progress_interval=0.0).fit(images)
    fractions = [p.fraction for p in rec.progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    steps_per_epoch = int(np.ceil(len(split_indices(len(images), 0.1, 3)[0]) / 64))
    assert rec.progress[-1].total_steps == 3 * steps_per_epoch
    assert rec.progress[-1].eta_seconds == 0.0
    assert all(p.eta_seconds is not None and p.eta_seconds >= 0 for p in rec.progress)
    assert [[r["split"] for r in rows] for rows in rec.epochs] == [["train", "val"]] * 3


def test_kl_warmup_ramps_beta_linearly(digits):
    images, _ = digits
    result = Trainer(MLP, dataclasses.replace(FAST, epochs=3, kl_warmup_epochs=2)).fit(images)
    train = [r for r in result.history if r["split"] == "train"]
    steps = int(np.ceil(len(result.train_rows) / 64))
    # beta after the last step of epoch e is min(1, e * steps / (2 * steps)).
    assert [r["beta"] for r in train] == pytest.approx([0.5, 1.0, 1.0])
    assert steps > 1


@pytest.mark.slow
@pytest.mark.parametrize("model_cfg", [
    VAEConfig(input_shape=(1, 8, 8), family="conv", hidden=(16, 32), latent_dim=4),
    VAEConfig(input_shape=(1, 8, 8), latent_dim=4, hidden=(64,), likelihood="gaussian",
              min_log_scale=-2.0),
    VAEConfig(input_shape=(1, 8, 8), latent_dim=4, hidden=(64,), beta=4.0),
], ids=["conv", "gaussian-learned", "beta4"])
def test_other_families_and_likelihoods_learn(digits, model_cfg):
    images, _ = digits
    cfg = dataclasses.replace(FAST, epochs=6, free_bits=0.1)
    result = Trainer(model_cfg, cfg).fit(images)
    val = [r["elbo"] for r in result.history if r["split"] == "val"]
    # well above an untrained model (the data-initialised start is already past it)
    torch.manual_seed(0)
    start = evaluate(VAE(model_cfg), images, result.val_rows,
                     importance_samples=0).summary()["elbo"]
    assert val[-1] > start + 1.0 and val[-1] >= val[0] - 0.5, (start, val)
    if model_cfg.likelihood == "gaussian":
        assert result.model.likelihood.log_scale().min().item() >= -2.0


def test_cancellation_stops_within_a_batch(digits):
    images, _ = digits

    class CancelNow(Callback):
        calls = 0

        def should_cancel(self):
            self.calls += 1
            return self.calls > 3

    cb = CancelNow()
    with pytest.raises(TrainingCancelled):
        Trainer(MLP, FAST, callbacks=[cb]).fit(images)
    assert cb.calls == 4


@pytest.mark.slow
def test_device_selection_and_cpu_fallback(digits):
    images, _ = digits
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            Trainer(MLP, dataclasses.replace(FAST, device="cuda"))
    auto = Trainer(MLP, dataclasses.replace(FAST, device="auto", mixed_precision=True))
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if auto.device.type == "cpu":
        # Mixed precision is a CUDA feature: on CPU it trains exactly as float32.
        cfg = dataclasses.replace(FAST, epochs=1)
        amp = Trainer(MLP, dataclasses.replace(cfg, mixed_precision=True)).fit(images)
        assert_same_weights(amp.model, Trainer(MLP, cfg).fit(images).model)


def test_divergence_is_a_clear_error(digits):
    images, _ = digits
    cfg = dataclasses.replace(FAST, lr=10.0, grad_clip=None, epochs=3)
    with pytest.raises(FloatingPointError, match="diverged"):
        Trainer(VAEConfig(input_shape=(1, 8, 8), likelihood="gaussian", gaussian_scale="fixed",
                          fixed_log_scale=-20.0), cfg).fit(images * 1e30)


def test_cpu_gradient_clipping_equals_torch_clip_grad_norm():
    torch.manual_seed(0)
    trainer = Trainer(MLP, FAST)
    for max_norm in (1e-3, 1e6):  # clipped, and untouched
        for p in trainer.model.parameters():
            p.grad = torch.randn_like(p)
        want = [p.grad.clone() for p in trainer.model.parameters()]
        reference = [torch.nn.Parameter(g.clone()) for g in want]
        for r, g in zip(reference, want, strict=True):
            r.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(reference, max_norm)
        trainer._clip_gradients(max_norm)
        for p, r in zip(trainer.model.parameters(), reference, strict=True):
            torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=0)


def test_the_decoder_starts_at_the_data_mean(digits):
    """With a learning rate too small to move the weights, the trained model's output bias
    is the log-odds of the training items' per-pixel mean (NumPy by hand)."""
    images, _ = digits
    cfg = dataclasses.replace(FAST, epochs=1, lr=1e-12, grad_clip=None)
    result = Trainer(MLP, cfg).fit(images)
    mean = np.clip(images[result.train_rows].reshape(len(result.train_rows), -1)
                   .astype(np.float64).mean(0), 1e-3, 1 - 1e-3)
    bias = result.model.decoder.body[-1].bias.detach().double().numpy()
    np.testing.assert_allclose(bias, np.log(mean / (1 - mean)), atol=1e-5)
    off = Trainer(MLP, dataclasses.replace(cfg, init_from_data=False)).fit(images)
    assert np.abs(off.model.decoder.body[-1].bias.detach().numpy()).max() < 0.2  # default init


@pytest.mark.slow
def test_cosine_schedule_follows_its_formula(digits):
    images, _ = digits
    cfg = dataclasses.replace(FAST, epochs=4, lr=1e-3, lr_schedule="cosine", lr_final=0.1)
    result = Trainer(MLP, cfg).fit(images)
    steps = int(np.ceil(len(result.train_rows) / cfg.batch_size))
    total = steps * cfg.epochs
    for row in (r for r in result.history if r["split"] == "train"):
        last = row["epoch"] * steps - 1  # the lr of the epoch's last step
        want = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * last / (total - 1))))
        assert row["lr"] == pytest.approx(want, rel=1e-9)
    assert result.history[-1]["lr"] == pytest.approx(1e-4, rel=1e-9)  # lr * lr_final at the end
