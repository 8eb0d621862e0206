"""Bad configs, data and checkpoint files each raise a clear error naming the problem."""

import os

import numpy as np
import pytest
import torch

from models.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from models.config import ConfigError, TrainConfig, VAEConfig
from models.data import DataError, open_npy, validate_array
from models.trainer import Trainer
from models.vae import VAE

MLP = VAEConfig(input_shape=(4,), latent_dim=2, hidden=(8,))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"input_shape": ()}, "input_shape: must have at least one dimension"),
    ({"input_shape": (0, 3)}, r"input_shape\[0\]: must be >= 1"),
    ({"input_shape": (4,), "latent_dim": 0}, r"latent_dim: must be in \[1, 4096\], got 0"),
    ({"input_shape": (4,), "latent_dim": 2.5}, "latent_dim: must be an integer"),
    ({"input_shape": (4,), "family": "rnn"}, "family: must be one of mlp, conv; got 'rnn'"),
    ({"input_shape": (4,), "likelihood": "poisson"}, "likelihood: must be one of"),
    ({"input_shape": (4,), "beta": -1.0}, "beta: must be >= 0.0"),
    ({"input_shape": (4,), "beta": float("nan")}, "beta: must be a finite number"),
    ({"input_shape": (4,), "family": "conv"}, r"the conv family needs \(C, H, W\) items"),
    ({"input_shape": (1, 7, 7), "family": "conv", "hidden": (8, 16)},
     "needs H and W divisible by 4; got 7x7"),
    ({"input_shape": (1, 8, 8), "family": "conv", "hidden": ()}, "at least one convolution"),
    ({"input_shape": "64"}, "input_shape: must be a list of integers"),
    ({"input_shape": (4,), "activation": "sigmoid"},
     "activation: must be one of relu, tanh, gelu, elu, silu, softplus, leaky_relu"),
])
def test_bad_model_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        VAEConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epochs": 0}, "epochs: must be in"),
    ({"lr": 0.0}, "lr: must be > 0.0"),
    ({"batch_size": True}, "batch_size: must be an integer"),
    ({"val_fraction": 0.95}, "val_fraction: must be >= 0.0 and <= 0.9"),
    ({"objective": "vae"}, "objective: must be one of elbo, iwae"),
    ({"device": "tpu"}, "device: must be one of auto, cpu, cuda"),
    ({"val_fraction": 0.0, "early_stopping_patience": 3}, "needs a validation split"),
    ({"importance_samples": -1}, "importance_samples: must be in"),
    ({"lr_schedule": "exponential"}, "lr_schedule: must be one of constant, cosine, step, iwae"),
    ({"lr_schedule": "step", "lr_milestones": [5, 3]}, "must be increasing epochs"),
    ({"lr_milestones": [5]}, "are the epochs of the 'step' schedule"),
    ({"lr_schedule": "step", "lr_milestones": "5"}, "lr_milestones: must be a list of epochs"),
    ({"lr_schedule": "step", "lr_gamma": 0.0}, "lr_gamma: must be > 0.0"),
    ({"adam_eps": 0.0}, "adam_eps: must be > 0.0"),
    ({"adam_beta1": 1.0}, "adam_beta1: must be >= 0.0 and <= 0.9999"),
])
def test_bad_train_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_config_json_round_trip_and_unknown_fields():
    cfg = VAEConfig(input_shape=[1, 8, 8], family="conv", hidden=[8, 16], beta=2.0)
    assert cfg.input_shape == (1, 8, 8)
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict(TrainConfig(epochs=3).to_dict()) == TrainConfig(epochs=3)
    with pytest.raises(ConfigError, match="model: unknown field.*latnt_dim"):
        VAEConfig.from_dict({"input_shape": [4], "latnt_dim": 3})
    with pytest.raises(ConfigError, match="model: .*input_shape"):
        VAEConfig.from_dict({"latent_dim": 3})
    with pytest.raises(ConfigError, match="training: expected an object"):
        TrainConfig.from_dict([1, 2])


@pytest.mark.parametrize(("array", "config", "message"), [
    (np.zeros((0, 4), np.float32), MLP, "data is empty"),
    (np.zeros((5, 3), np.float32), MLP, r"item shape \[3\] does not match .* \[4\]"),
    (np.array([["a", "b", "c", "d"]]), MLP, "data must be numeric; got dtype <U1"),
    (np.ones((3, 4), np.complex64), MLP, "real-valued"),
    (np.array([[0, 0, 0, 0], [0, np.nan, 0, 0]], np.float32), MLP,
     r"non-finite values \(NaN or infinity\) at item 1"),
    (np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, np.inf, 0, 0]]), MLP, "at item 2"),
    (np.array([[0, 0.5, 1, 0], [0, 2.0, 0, -0.5]], np.float32), MLP,
     r"bernoulli likelihood needs values in \[0, 1\]; item 1 has values in \[-0.5, 2\]"),
    (np.zeros((2, 8, 8), np.float32),
     VAEConfig(input_shape=(1, 8, 8), family="conv", hidden=(4,)),
     r"item shape \[8, 8\] does not match the model's input_shape \[1, 8, 8\]"),
])
def test_bad_data(array, config, message):
    with pytest.raises(DataError, match=message):
        validate_array(array, config)
    with pytest.raises(DataError, match=message):
        Trainer(config, TrainConfig(epochs=1)).fit(array)


def test_gaussian_accepts_any_finite_values():
    cfg = VAEConfig(input_shape=(4,), likelihood="gaussian")
    stats = validate_array(np.array([[-3, 0, 5, 1e3]], np.float64), cfg)
    assert (stats.minimum, stats.maximum) == (-3, 1e3)


def test_too_few_items_for_the_split():
    with pytest.raises(DataError, match="nothing to train on"):
        Trainer(MLP, TrainConfig(epochs=1, val_fraction=0.5)).fit(np.zeros((1, 4), np.float32))


def test_pickled_npy_is_refused_not_loaded(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"a": 1}], dtype=object))  # numpy pickles object arrays
    with pytest.raises(DataError, match="not a plain numeric .npy array"):
        open_npy(path)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VAE(MLP)
    path = tmp_path / "c.safetensors"
    digest = save_checkpoint(path, Checkpoint(MLP, model.state_dict(),
                                              progress={"epoch": 3}, history=[{"a": 1.5}]))
    assert len(digest) == 64
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temp file left behind
    loaded = load_checkpoint(path)
    assert loaded.model_config == MLP and loaded.progress == {"epoch": 3}
    assert loaded.history == [{"a": 1.5}]
    x = torch.rand(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(load_model(path).encode(x), model.eval().encode(x),
                                   rtol=0, atol=0)


def test_checkpoint_files_that_are_not_ours_are_refused(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_checkpoint(garbage)
    # A pickle-based torch.save file is refused without being unpickled.
    pickled = tmp_path / "pickled.pt"
    torch.save({"weights": torch.zeros(2)}, pickled)
    with pytest.raises(CheckpointError):
        load_checkpoint(pickled)
    # A safetensors file without our metadata.
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"model/w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(foreign)


def test_checkpoint_weights_must_fit_config(tmp_path):
    path = tmp_path / "c.safetensors"
    other = VAEConfig(input_shape=(4,), latent_dim=3, hidden=(8,))
    save_checkpoint(path, Checkpoint(MLP, VAE(other).state_dict()))
    with pytest.raises(CheckpointError, match="do not fit the checkpoint's config"):
        load_model(path)
