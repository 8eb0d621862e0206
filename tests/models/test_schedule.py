"""The IWAE paper's options: activations against their formulas, the learning-rate
schedules against theirs (and through the trainer), Adam's settings reaching Adam."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.special import erf

from models.config import ACTIVATIONS, TrainConfig, VAEConfig
from models.data import load_digits_dataset
from models.schedule import iwae_epochs, iwae_stage, learning_rate
from models.trainer import Trainer
from models.vae import VAE

FORMULAS = {
    "relu": lambda a: np.maximum(a, 0),
    "tanh": np.tanh,
    "gelu": lambda a: 0.5 * a * (1 + erf(a / math.sqrt(2))),
    "elu": lambda a: np.where(a > 0, a, np.expm1(np.minimum(a, 0))),
    "silu": lambda a: a / (1 + np.exp(-a)),
    "softplus": lambda a: np.logaddexp(0, a),
    "leaky_relu": lambda a: np.where(a > 0, a, 0.01 * a),
}


def test_every_activation_has_its_formula():
    assert set(FORMULAS) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_the_mlp_computes_its_activation(name):
    """mu, logvar = W3 f(W2 f(W1 x + b1) + b2) + b3 in float64 NumPy, f the formula."""
    cfg = VAEConfig(input_shape=(6,), latent_dim=2, hidden=(5, 4), activation=name)
    torch.manual_seed(0)
    model = VAE(cfg).eval()
    x = np.random.default_rng(1).normal(scale=2.0, size=(7, 6))
    h = x
    linears = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    for i, layer in enumerate(linears):
        w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
        h = h @ w.T + b
        if i < len(linears) - 1:
            h = FORMULAS[name](h)
    with torch.no_grad():
        mu, logvar = model.encode(torch.from_numpy(x).float())
    np.testing.assert_allclose(np.concatenate([mu.numpy(), logvar.numpy()], 1), h,
                               rtol=1e-5, atol=1e-5)
    assert cfg.architecture() == f"mlp 6-5-4-2 {name}, bernoulli"


def test_activation_defaults_to_relu_and_old_configs_load():
    old = VAEConfig(input_shape=(4,)).to_dict()
    del old["activation"]  # a model stored before the option existed
    assert VAEConfig.from_dict(old).activation == "relu"


def test_iwae_stages_are_three_to_the_i_epochs():
    # enumerate the paper's schedule: stage i repeated 3^i times, i = 0..7
    enumerated = [i for i in range(8) for _ in range(3 ** i)]
    assert len(enumerated) == 3280 == iwae_epochs(8)
    assert [iwae_stage(e) for e in range(3280)] == enumerated
    assert iwae_epochs(4) == 40 and iwae_stage(39) == 3 and iwae_stage(40) == 4
    cfg = TrainConfig(lr=1e-3, lr_schedule="iwae")
    for epoch in (0, 1, 3, 4, 12, 13, 39, 1093, 3279):
        want = 1e-3 * 10 ** (-enumerated[epoch] / 7)
        assert learning_rate(cfg, epoch, 0, 1) == pytest.approx(want, rel=1e-12)
    assert learning_rate(cfg, 3279, 0, 1) == pytest.approx(1e-4, rel=1e-12)  # 10^(-7/7)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        iwae_stage(-1)


def test_step_schedule_multiplies_by_gamma_at_each_milestone():
    cfg = TrainConfig(lr=0.01, lr_schedule="step", lr_milestones=[2, 5], lr_gamma=0.5)
    got = [learning_rate(cfg, e, 0, 1) for e in range(7)]
    assert got == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.005, 0.0025, 0.0025])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["lr_milestones"] == [2, 5]


def test_the_trainer_follows_the_iwae_schedule_with_adams_settings():
    images, _ = load_digits_dataset()
    cfg = TrainConfig(epochs=5, batch_size=128, lr=1e-3, lr_schedule="iwae", adam_eps=1e-4,
                      adam_beta1=0.99, eval_importance_samples=0, importance_samples=0,
                      val_fraction=0.0)
    model = VAEConfig(input_shape=(1, 8, 8), latent_dim=4, hidden=(16,), activation="tanh",
                      binarize="dynamic")
    trainer = Trainer(model, cfg)
    group = trainer.optimizer.param_groups[0]
    assert group["eps"] == 1e-4 and group["betas"] == (0.99, 0.999)
    result = trainer.fit(images)
    lrs = [row["lr"] for row in result.history if row["split"] == "train"]
    # epochs 0 | 1 2 3 | 4: stages 0, 1, 1, 1, 2
    assert lrs == pytest.approx([1e-3 * 10 ** (-i / 7) for i in (0, 1, 1, 1, 2)], rel=1e-12)
    first = dataclasses.replace(cfg, epochs=2)  # a resumed run follows the same curve
    resumed = Trainer(model, cfg)
    part = Trainer(model, first)
    part.fit(images)
    out = resumed.fit(images, resume=part.checkpoint())
    assert [r["lr"] for r in out.history if r["split"] == "train"] == pytest.approx(lrs)
