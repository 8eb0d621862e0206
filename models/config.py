"""Configuration of a VAE and of its training: small dataclasses of plain values.

Both validate themselves on construction and round-trip through JSON
(`to_dict` / `from_dict`); unknown keys are an error, not silently dropped,
so a typo in a submitted config never trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

Family = Literal["mlp", "conv"]
LikelihoodName = Literal["bernoulli", "continuous_bernoulli", "gaussian", "discretized_logistic"]
Objective = Literal["elbo", "iwae"]

FAMILIES = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "gaussian", "discretized_logistic")
NORMS = ("none", "group")
ACTIVATIONS = ("relu", "tanh", "gelu", "elu", "silu", "softplus", "leaky_relu")
LR_SCHEDULES = ("constant", "cosine", "step", "iwae")
# the floor of a learned log-scale when the config leaves it unset
MIN_LOG_SCALE = {"gaussian": -4.0, "discretized_logistic": -7.0}
BINARIZE = ("none", "static", "dynamic")
DEQUANTIZE = ("none", "uniform")
OBJECTIVES = ("elbo", "iwae")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def _fail(name: str, message: str) -> None:
    raise ConfigError(f"{name}: {message}")


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        _fail(name, f"must be {bound}, got {value}")


def _check_float(name: str, value: object, *, low: float, high: float | None = None,
                 low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(name, f"must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        op = ">" if low_open else ">="
        bound = f"{op} {low}" if high is None else f"{op} {low} and <= {high}"
        _fail(name, f"must be {bound}, got {value}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, f"must be one of {', '.join(choices)}; got {value!r}")


T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any], what: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected an object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class VAEConfig:
    """Architecture and likelihood of one VAE.

    `input_shape` is the shape of one item: `(D,)` or `(C, H, W)`; `mlp` flattens
    any shape, `conv` needs `(C, H, W)` with H and W divisible by 2**len(hidden).
    `hidden` lists layer widths (mlp) or channel counts of stride-2 convolutions (conv).
    For `gaussian`, `gaussian_scale` is `learned` (one log-scale per data dimension,
    floored at `min_log_scale`, by default -4) or `fixed` (`fixed_log_scale` everywhere).
    `continuous_bernoulli` is the Bernoulli with its normalising constant: a density on
    [0, 1] (Loaiza-Ganem & Cunningham, 2019). `discretized_logistic` is made for 8-bit
    data: the probability of each value's bin on the grid k / (`levels` - 1) under a
    logistic with one learned scale per channel (PixelCNN++, IAF; models/likelihoods.py),
    floored at `min_log_scale`, by default -7 (PixelCNN++'s floor; a bin's probability is
    at most 1, so no floor keeps it finite, but the Gaussian's -4 would cap an interior
    value's probability at 0.053, 4.2 bits); it takes values in [0, 1] and no
    dequantisation. An unset `min_log_scale` is filled in with the likelihood's default.
    `beta` weights the KL term of the training objective (beta-VAE); reported ELBOs
    always use beta = 1.

    What the model sees (models/transforms.py): `binarize` (`bernoulli` only) is `static`
    (one binary copy drawn with `data_seed`) or `dynamic` (drawn anew each training
    epoch, evaluated on the `data_seed` copy); `dequantize: uniform` (`gaussian` or
    `continuous_bernoulli`) takes integer data 0 .. `levels` - 1 to (x + u) / levels and
    reports the discrete data's log-probability.

    The conv family at 32x32 and 64x64 (RGB or grey): `blocks` residual blocks (two 3x3
    convolutions, the second started at zero so each block starts as the identity) follow
    every stride-2 layer, deepening the network without the vanishing or exploding signal
    a plain stack of that depth has; `norm: group` puts GroupNorm before each activation
    (statistics per item, so training and evaluation compute the same function, the ONNX
    graph has no running statistics to freeze, and small batches do not matter, unlike
    BatchNorm). `blocks: 0` with `norm: none` is the plain network of earlier models,
    parameter for parameter. Both apply to the conv family only.

    `activation` is the nonlinearity after every hidden layer of either family (`relu`;
    `tanh` is the IWAE paper's; it has no parameters, so a model's weights keep their
    names whichever is chosen).
    """

    input_shape: tuple[int, ...]
    """Shape of one item, `[D]` or `[C, H, W]`."""
    latent_dim: int = 16
    """D of z."""
    family: Family = "mlp"
    """`mlp` or `conv`."""
    hidden: tuple[int, ...] = (256, 128)
    """Layer widths (mlp) or channels of the stride-2 convolutions (conv)."""
    likelihood: LikelihoodName = "bernoulli"
    """`bernoulli` (values in [0, 1]), `continuous_bernoulli` (values in [0, 1]; a true
    density), `gaussian`, or `discretized_logistic` (values on the grid k/(`levels` − 1) in
    [0, 1], 8-bit images: log p(x) and bits/dim of the discrete pixels)."""
    gaussian_scale: Literal["learned", "fixed"] = "learned"
    """`learned` (one log σ per data dimension) or `fixed`."""
    fixed_log_scale: float = 0.0
    """Log σ when fixed."""
    min_log_scale: float | None = None  # the likelihood's own: MIN_LOG_SCALE
    """Floor of a learned log σ (or log s: at −4 a discretised logistic could not give an
    interior 8-bit value more than 4.2 bits) (pixels that never vary would otherwise drive σ
    → 0 and the likelihood → +∞); unset: −4.0, or −7.0 for `discretized_logistic`."""
    beta: float = 1.0
    """Weight of the KL term in the training objective (β-VAE); reported ELBOs always use β =
    1."""
    binarize: Literal["none", "static", "dynamic"] = "none"
    """`bernoulli` only: `static` (one binary copy drawn with `data_seed`, for training and
    evaluation) or `dynamic` (drawn anew each training epoch, evaluated on the `data_seed`
    copy: the IWAE paper's protocol)."""
    dequantize: Literal["none", "uniform"] = "none"
    """`uniform` (`gaussian` or `continuous_bernoulli`): integer data 0 .. `levels` − 1 becomes
    y = (x + u) / levels, u ~ U[0, 1)."""
    levels: int = 256
    """The number of integer levels of `dequantize` and of the `discretized_logistic` grid."""
    data_seed: int = 0
    """Seed of the fixed binarisation / dequantisation noise (evaluation, embedding, `/score`)."""
    blocks: int = 0
    """Conv only: residual blocks per resolution; 0 (with `norm: none`) is the plain network of
    earlier releases, parameter for parameter."""
    norm: Literal["none", "group"] = "none"
    """Conv only: `group` normalisation (GroupNorm, up to 32 groups: batch-independent and
    exported to ONNX as is, unlike BatchNorm) or `none`."""
    activation: str = "relu"
    """The nonlinearity after every hidden layer of either family: `relu`, `tanh` (the IWAE
    paper's), `gelu`, `elu`, `silu`, `softplus`, `leaky_relu`; recorded in the model's
    `summary.architecture` and each ONNX file's `latentbank.activation`."""

    def __post_init__(self) -> None:
        # JSON gives lists; store tuples so the config is hashable and immutable.
        for name in ("input_shape", "hidden"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            elif not isinstance(value, tuple):
                _fail(name, f"must be a list of integers, got {value!r}")
        if not self.input_shape:
            _fail("input_shape", "must have at least one dimension")
        for i, d in enumerate(self.input_shape):
            _check_int(f"input_shape[{i}]", d, low=1)
        _check_int("latent_dim", self.latent_dim, low=1, high=4096)
        _check_choice("family", self.family, FAMILIES)
        for i, h in enumerate(self.hidden):
            _check_int(f"hidden[{i}]", h, low=1, high=65536)
        _check_choice("likelihood", self.likelihood, LIKELIHOODS)
        _check_choice("gaussian_scale", self.gaussian_scale, ("learned", "fixed"))
        _check_float("fixed_log_scale", self.fixed_log_scale, low=-20.0, high=20.0)
        if self.min_log_scale is None:
            object.__setattr__(self, "min_log_scale", MIN_LOG_SCALE.get(self.likelihood, -4.0))
        _check_float("min_log_scale", self.min_log_scale, low=-20.0, high=20.0)
        _check_float("beta", self.beta, low=0.0, high=1e4)
        _check_choice("binarize", self.binarize, BINARIZE)
        _check_choice("dequantize", self.dequantize, DEQUANTIZE)
        _check_int("levels", self.levels, low=2, high=1 << 16)
        _check_int("data_seed", self.data_seed, low=0, high=2**63 - 1)
        _check_int("blocks", self.blocks, low=0, high=16)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        if self.family != "conv" and (self.blocks or self.norm != "none"):
            _fail("blocks" if self.blocks else "norm", "residual blocks and normalisation "
                  "are options of the conv family (family 'conv', or blocks 0 and norm 'none')")
        if self.dequantize != "none" and self.likelihood == "discretized_logistic":
            _fail("dequantize", "the discretized_logistic likelihood gives discrete 8-bit "
                  "data its probability directly; use dequantize 'none' (or the "
                  "'gaussian' likelihood with uniform dequantisation)")
        if self.binarize != "none" and self.likelihood != "bernoulli":
            _fail("binarize", f"binarises data for the bernoulli likelihood; got likelihood "
                  f"{self.likelihood!r} (use 'bernoulli', or binarize 'none')")
        if self.dequantize != "none" and self.likelihood == "bernoulli":
            _fail("dequantize", "makes integer data continuous for a density "
                  "('gaussian' or 'continuous_bernoulli'); bernoulli takes binary data "
                  "(use binarize instead)")
        if self.family == "conv":
            if len(self.input_shape) != 3:
                _fail("input_shape", "the conv family needs (C, H, W) items; "
                      f"got {list(self.input_shape)} (use family 'mlp' for flat data)")
            if not self.hidden:
                _fail("hidden", "the conv family needs at least one convolution")
            factor = 2 ** len(self.hidden)
            _, h, w = self.input_shape
            if h % factor or w % factor:
                _fail("input_shape", f"the conv family with {len(self.hidden)} stride-2 "
                      f"layers needs H and W divisible by {factor}; got {h}x{w}")

    @property
    def input_size(self) -> int:
        return math.prod(self.input_shape)

    def architecture(self) -> str:
        """One line, e.g. 'mlp 784-200-200-50 tanh, bernoulli' (the widths of the
        encoder; the decoder mirrors it)."""
        widths = "-".join(str(w) for w in (self.input_size, *self.hidden, self.latent_dim))
        extra = (f", {self.blocks} blocks" if self.blocks else "") + (
            f", {self.norm} norm" if self.norm != "none" else "")
        return f"{self.family} {widths} {self.activation}{extra}, {self.likelihood}"

    def likelihood_kind(self, data_is_binary: bool) -> str:
        """Which figure log p(x) is for data like the training data: `discrete` (the
        probability of binary, dequantised integer or (discretised logistic) 8-bit data;
        bits/dim apply), `density` (a
        density of continuous data) or `unnormalised` (Bernoulli on grey data: not a
        likelihood of anything, comparable with nothing published)."""
        if self.dequantize != "none" or self.likelihood == "discretized_logistic" or (
                self.likelihood == "bernoulli" and (
                self.binarize != "none" or data_is_binary)):
            return "discrete"
        return "unnormalised" if self.likelihood == "bernoulli" else "density"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        return _from_dict(cls, data, "model")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimiser, schedule, objective, evaluation and device.

    `objective` is `elbo` (with beta, linear KL warm-up over `kl_warmup_epochs` and
    optional `free_bits` nats per latent dimension; its reconstruction term averages
    `elbo_samples` draws) or `iwae` (the IWAE bound with `iwae_samples` samples).
    `lr_schedule` (models/schedule.py) is `constant`, `cosine` (from `lr` down to
    `lr * lr_final` at the last step, by step count, so a resumed run follows the same
    curve), `step` (`lr` times `lr_gamma` for each of `lr_milestones`, epochs, passed) or
    `iwae` (Burda et al.'s: stage i = 0, 1, ... lasts 3^i epochs at `lr` * 10^(-i/7); 40
    epochs are stages 0-3, 3,280 all eight). `adam_eps`, `adam_beta1` and `adam_beta2` are
    Adam's (the IWAE paper: eps 1e-4; its code's beta1 is 0.99 where the paper says 0.9).
    `init_from_data` starts the decoder's output bias at the training data's per-value
    mean (its log-odds for the Bernoulli kinds) and a learned Gaussian scale at the data's
    spread, so the first steps fit the codes rather than the average item
    (bench/likelihood.py measures its effect).
    `eval_importance_samples` is K of the per-epoch validation log p(x) estimate,
    `importance_samples` the K of the final held-out evaluation (0 skips it).
    `early_stopping_patience` counts epochs without a validation-ELBO gain of more than
    `min_delta` nats.
    """

    epochs: int = 20
    """Adam: epochs."""
    batch_size: int = 128
    """Adam: batch size."""
    lr: float = 1e-3
    """Adam: learning rate."""
    weight_decay: float = 0.0
    """Adam: weight decay."""
    seed: int = 0
    """Seeds initialisation, the split and every random draw."""
    val_fraction: float = 0.1
    """Held-out share (0 allowed: no validation rows)."""
    grad_clip: float | None = 100.0
    """Max global gradient norm (`null` disables)."""
    early_stopping_patience: int | None = None
    """Stop after this many epochs without a validation-ELBO gain > `min_delta`, and restore
    the best epoch's weights (unset: no early stopping)."""
    min_delta: float = 0.0
    """The validation-ELBO gain (nats) that counts for early stopping."""
    objective: Objective = "elbo"
    """`elbo` (β, warm-up, free bits apply; `elbo_samples` draws) or `iwae` (IWAE bound with
    `iwae_samples`)."""
    elbo_samples: int = 1
    """Draws the `elbo` objective's reconstruction term averages."""
    iwae_samples: int = 5
    """Samples of the `iwae` objective's bound."""
    lr_schedule: Literal["constant", "cosine", "step", "iwae"] = "constant"
    """`constant`; `cosine` decays `lr` to `lr * lr_final` by the last step (measured worse
    than constant at 5–10 epochs: `bench/likelihood.py`); `step` multiplies `lr` by
    `lr_gamma` at each epoch of `lr_milestones`; `iwae` is Burda et al.'s: stage i = 0, 1, …
    lasts 3^i epochs at `lr`·10^(−i/7), so 40 epochs are stages 0–3 and 3,280 all eight
    (`models/schedule.py`)."""
    lr_final: float = 0.1
    """The `cosine` schedule's last learning rate, as a share of `lr`."""
    lr_milestones: tuple[int, ...] = ()
    """The epochs at which the `step` schedule multiplies `lr` by `lr_gamma`."""
    lr_gamma: float = 0.1
    """The `step` schedule's factor."""
    adam_eps: float = 1e-8
    """Adam's ε (the IWAE paper: ε = 1e-4)."""
    adam_beta1: float = 0.9
    """Adam's β1."""
    adam_beta2: float = 0.999
    """Adam's β2."""
    init_from_data: bool = True
    """The decoder's output bias starts at the training items' mean (its log-odds for the
    Bernoulli kinds; a learned Gaussian scale at their spread)."""
    kl_warmup_epochs: int = 0
    """Β rises linearly from 0 to `beta` over this many epochs (per step)."""
    free_bits: float = 0.0
    """Each latent dimension's batch-mean KL counts as at least this many nats."""
    eval_importance_samples: int = 16
    """K of the per-epoch validation log p(x)."""
    importance_samples: int = 1000
    """K of the final held-out log p(x) (0 = ELBO terms only)."""
    eval_batch_size: int = 512
    """Items per batch of the evaluation passes."""
    device: str = "auto"
    """`auto` (CUDA if present), `cpu`, `cuda`."""
    mixed_precision: bool = False
    """Bf16 autocast on CUDA (fp16 + loss scaling where bf16 is missing); ignored on CPU."""

    def __post_init__(self) -> None:
        if isinstance(self.lr_milestones, list):
            object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))
        elif not isinstance(self.lr_milestones, tuple):
            _fail("lr_milestones", f"must be a list of epochs, got {self.lr_milestones!r}")
        _check_int("epochs", self.epochs, low=1, high=100_000)
        _check_int("batch_size", self.batch_size, low=1, high=1 << 20)
        _check_float("lr", self.lr, low=0.0, high=10.0, low_open=True)
        _check_float("weight_decay", self.weight_decay, low=0.0, high=1.0)
        _check_int("seed", self.seed, low=0, high=2**63 - 1)
        _check_float("val_fraction", self.val_fraction, low=0.0, high=0.9)
        if self.grad_clip is not None:
            _check_float("grad_clip", self.grad_clip, low=0.0, low_open=True)
        if self.early_stopping_patience is not None:
            _check_int("early_stopping_patience", self.early_stopping_patience, low=1)
            if self.val_fraction == 0:
                _fail("early_stopping_patience", "needs a validation split (val_fraction > 0)")
        _check_float("min_delta", self.min_delta, low=0.0)
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_int("elbo_samples", self.elbo_samples, low=1, high=10_000)
        _check_int("iwae_samples", self.iwae_samples, low=1, high=10_000)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_float("lr_final", self.lr_final, low=0.0, high=1.0)
        if len(self.lr_milestones) > 64:
            _fail("lr_milestones", f"at most 64 milestones, got {len(self.lr_milestones)}")
        for i, m in enumerate(self.lr_milestones):
            _check_int(f"lr_milestones[{i}]", m, low=1, high=100_000)
        if list(self.lr_milestones) != sorted(set(self.lr_milestones)):
            _fail("lr_milestones", f"must be increasing epochs, got {list(self.lr_milestones)}")
        if self.lr_milestones and self.lr_schedule != "step":
            _fail("lr_milestones", "are the epochs of the 'step' schedule; set lr_schedule "
                  f"'step' (got {self.lr_schedule!r}) or leave them out")
        _check_float("lr_gamma", self.lr_gamma, low=0.0, high=1.0, low_open=True)
        _check_float("adam_eps", self.adam_eps, low=0.0, high=1.0, low_open=True)
        _check_float("adam_beta1", self.adam_beta1, low=0.0, high=0.9999)
        _check_float("adam_beta2", self.adam_beta2, low=0.0, high=0.99999)
        if not isinstance(self.init_from_data, bool):
            _fail("init_from_data", f"must be true or false, got {self.init_from_data!r}")
        _check_int("kl_warmup_epochs", self.kl_warmup_epochs, low=0)
        _check_float("free_bits", self.free_bits, low=0.0, high=100.0)
        _check_int("eval_importance_samples", self.eval_importance_samples, low=0, high=100_000)
        _check_int("importance_samples", self.importance_samples, low=0, high=100_000)
        _check_int("eval_batch_size", self.eval_batch_size, low=1, high=1 << 20)
        _check_choice("device", self.device, DEVICES)
        if not isinstance(self.mixed_precision, bool):
            _fail("mixed_precision", f"must be true or false, got {self.mixed_precision!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data, "training")
