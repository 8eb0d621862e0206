"""RGB conv VAEs on 8-bit images: the residual/normalised conv family, training on
generated uint8 images (coloured shapes) with the discretised logistic, and the 8-bit
view of a uint8 memory map (the same batches as its float32 twin)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from models.config import ConfigError, TrainConfig, VAEConfig
from models.data import DataError, iter_batches, open_npy, validate_array
from models.trainer import Trainer
from models.transforms import needs_value_scan, range_problem, value_problem
from models.vae import VAE

COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230], [240, 220, 30]])


def shapes(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images (n, 3, size, size): a grey background with noise and a filled square
    or disc whose colour is its class, at a random place and size."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(COLOURS), n)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        img = np.full((size, size, 3), rng.integers(60, 120), dtype=np.int64)
        img += rng.integers(-8, 9, img.shape)
        r = rng.integers(size // 6, size // 3)
        cy, cx = rng.integers(r, size - r, 2)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if i % 2 else (
            (abs(yy - cy) <= r) & (abs(xx - cx) <= r))
        img[mask] = COLOURS[label]
        images[i] = np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return images, labels


def test_blocks_0_without_norm_is_the_plain_network_of_earlier_models():
    """The conv family as it was (stride-2 convolutions and ReLUs, a linear head; a linear
    stem and transposed convolutions), written out here: a checkpoint of it loads into
    today's model with the same parameter names and computes the same function."""
    cfg = VAEConfig(input_shape=(3, 16, 16), family="conv", hidden=(4, 8), latent_dim=3,
                    likelihood="gaussian")
    enc = nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 4, 2, 1),
                        nn.ReLU())
    head = nn.Linear(8 * 4 * 4, 6)
    stem = nn.Sequential(nn.Linear(3, 8 * 4 * 4), nn.ReLU())
    dec = nn.Sequential(nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.ReLU(),
                        nn.ConvTranspose2d(4, 3, 4, 2, 1))
    state = {f"encoder.body.{k}": v for k, v in enc.state_dict().items()}
    state |= {f"encoder.head.{k}": v for k, v in head.state_dict().items()}
    state |= {f"decoder.stem.{k}": v for k, v in stem.state_dict().items()}
    state |= {f"decoder.body.{k}": v for k, v in dec.state_dict().items()}
    state["likelihood.log_scale_param"] = torch.zeros(3, 16, 16)
    model = VAE(cfg)
    model.load_state_dict(state, strict=True)
    x, z = torch.rand(2, 3, 16, 16), torch.randn(2, 3)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        want = head(enc(x).flatten(1)).chunk(2, -1)
        torch.testing.assert_close(mu, want[0])
        torch.testing.assert_close(logvar, want[1])
        torch.testing.assert_close(model.decode(z), dec(stem(z).unflatten(-1, (8, 4, 4))))


def test_residual_blocks_start_as_the_identity_and_norm_is_group_norm():
    cfg = VAEConfig(input_shape=(3, 32, 32), family="conv", hidden=(8, 16), blocks=2,
                    norm="group", likelihood="discretized_logistic")
    model = VAE(cfg)
    blocks = [m for m in model.modules() if type(m).__name__ == "ResidualBlock"]
    assert len(blocks) == 2 * 2 + 2 * 1 + 2  # encoder 2 stages, decoder stem and 1 stage
    h = torch.randn(2, 8, 16, 16)
    block = model.encoder.body[3]
    assert type(block).__name__ == "ResidualBlock"
    torch.testing.assert_close(block(h), h)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # per item: an item's output does not depend on the rest of its batch
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x[:1])[0], model.encode(x)[0][:1])


def test_options_are_validated():
    with pytest.raises(ConfigError, match="blocks: residual blocks and normalisation"):
        VAEConfig(input_shape=(12,), blocks=1)
    with pytest.raises(ConfigError, match="norm: must be one of none, group"):
        VAEConfig(input_shape=(3, 8, 8), family="conv", hidden=(4,), norm="batch")
    with pytest.raises(ConfigError, match="blocks: must be in"):
        VAEConfig(input_shape=(3, 8, 8), family="conv", hidden=(4,), blocks=-1)
    old = VAEConfig(input_shape=(1, 8, 8), family="conv", hidden=(4,)).to_dict()
    del old["blocks"], old["norm"]  # a stored config from before the options
    assert VAEConfig.from_dict(old).blocks == 0


@pytest.mark.slow
@pytest.mark.parametrize(("size", "hidden", "blocks", "norm", "n"), [
    (32, (16, 32), 0, "none", 192),
    (64, (8, 16, 16), 1, "group", 96),
])
def test_rgb_conv_vae_trains_on_8bit_shapes_with_the_discretized_logistic(
        tmp_path, size, hidden, blocks, norm, n):
    images, _ = shapes(n, size)
    path = tmp_path / "images.npy"
    np.save(path, images)
    data = open_npy(path)  # uint8 memory map, as a dataset is stored
    cfg = VAEConfig(input_shape=(3, size, size), family="conv", hidden=hidden, latent_dim=8,
                    blocks=blocks, norm=norm, likelihood="discretized_logistic",
                    min_log_scale=-7.0)
    train = TrainConfig(epochs=4, batch_size=32, lr=2e-3, seed=0, val_fraction=0.25,
                        eval_importance_samples=0, importance_samples=0)
    result = Trainer(cfg, train).fit(data)
    val = [row for row in result.history if row["split"] == "val"]
    elbos = [row["elbo"] for row in val]
    assert all(math.isfinite(e) for e in elbos)
    assert elbos[-1] > elbos[0]
    # a log-probability of 8-bit data: better than the uniform 8 bits a value
    bits = -elbos[-1] / (3 * size * size * math.log(2))
    assert 0 < bits < 8


def test_uint8_memmap_gives_the_batches_of_its_float32_twin(tmp_path):
    """Every likelihood, from the uint8 file and from its twin written as float32 x / 255
    (as integers 0..255 for the dequantising Gaussian): the same batches, in the same order,
    binarised and dequantised with the same noise."""
    images, _ = shapes(40, 8, seed=1)
    np.save(tmp_path / "u8.npy", images)
    np.save(tmp_path / "f32.npy", images.astype(np.float64) / 255)
    np.save(tmp_path / "int.npy", images.astype(np.float32))
    u8 = open_npy(tmp_path / "u8.npy")
    assert u8.dtype == np.uint8 and isinstance(u8, np.memmap)
    shape = (3, 8, 8)
    for cfg, twin_file in (
            (VAEConfig(input_shape=shape, likelihood="discretized_logistic"), "f32.npy"),
            (VAEConfig(input_shape=shape, likelihood="bernoulli", binarize="dynamic"),
             "f32.npy"),
            (VAEConfig(input_shape=shape, likelihood="gaussian", dequantize="uniform"),
             "int.npy"),
            (VAEConfig(input_shape=shape, likelihood="continuous_bernoulli"), "f32.npy")):
        twin = open_npy(tmp_path / twin_file)
        stats_u8, stats_twin = validate_array(u8, cfg), validate_array(twin, cfg)
        assert stats_u8.minimum == pytest.approx(stats_twin.minimum, abs=1e-7)
        assert stats_u8.maximum == pytest.approx(stats_twin.maximum, abs=1e-7)
        rows = np.arange(40)
        a = list(iter_batches(u8, rows, 16, cfg, np.random.default_rng(5), noise_seed=9))
        b = list(iter_batches(twin, rows, 16, cfg, np.random.default_rng(5), noise_seed=9))
        assert [len(t) for t in a] == [16, 16, 8]
        for x, y in zip(a, b, strict=True):
            assert x.dtype == torch.float32 and x.shape[1:] == shape
            torch.testing.assert_close(x, y, atol=1e-7, rtol=0)
    # a dequantising model sees the integers: its levels must hold 0 .. 255, which the
    # stored range (x / 255, in [0, 1]) cannot tell, so the embedding worker scans them
    few = VAEConfig(input_shape=shape, likelihood="gaussian", dequantize="uniform", levels=16)
    with pytest.raises(DataError, match="integers 0 .. 15"):
        validate_array(u8, few)
    assert range_problem(0.0, 1.0, few) is None
    assert needs_value_scan("uint8", few)
    assert value_problem(np.asarray(u8).reshape(40, -1), few) is not None
    many = VAEConfig(input_shape=shape, likelihood="gaussian", dequantize="uniform")
    assert not needs_value_scan("uint8", many)
    assert needs_value_scan("float32", many) and not needs_value_scan("int16", many)


@pytest.mark.parametrize("cfg", [
    VAEConfig(input_shape=(3, 8, 8), family="conv", hidden=(4,), latent_dim=2,
              likelihood="bernoulli", binarize="dynamic"),
    VAEConfig(input_shape=(3, 8, 8), family="conv", hidden=(4,), latent_dim=2,
              likelihood="gaussian", dequantize="uniform"),
    VAEConfig(input_shape=(3, 8, 8), family="conv", hidden=(4,), latent_dim=2,
              likelihood="discretized_logistic"),
], ids=["bernoulli-binarised", "gaussian-dequantised", "discretized-logistic"])
@pytest.mark.slow
def test_training_on_a_uint8_memmap_equals_training_on_its_twin(tmp_path, cfg):
    images, _ = shapes(48, 8, seed=2)
    np.save(tmp_path / "u8.npy", images)
    twin = (images.astype(np.float32) if cfg.dequantize != "none"
            else images.astype(np.float64) / 255)
    np.save(tmp_path / "twin.npy", twin)
    train = TrainConfig(epochs=2, batch_size=16, seed=3, eval_importance_samples=4,
                        importance_samples=0)
    runs = [Trainer(cfg, train).fit(open_npy(tmp_path / f)) for f in ("u8.npy", "twin.npy")]
    for a, b in zip(runs[0].history, runs[1].history, strict=True):
        assert a["split"] == b["split"]
        assert math.isfinite(a["elbo"])
        assert a["elbo"] == pytest.approx(b["elbo"], rel=1e-4)


@pytest.mark.slow
def test_pipeline_on_8bit_rgb_reports_bits_and_the_exported_decoder_scores_as_torch(tmp_path):
    """train -> held-out evaluation -> ONNX on a uint8 memory map: a 'discrete' figure with
    bits/dim, and the API's NumPy log p(x|z) over the exported decoder's outputs equals the
    torch model's at the same codes (float32 graph against float32 torch)."""
    import onnxruntime as ort

    from models.pipeline import train_evaluate_export
    from service.api.scoring import log_px_given_z

    images, _ = shapes(64, 16, seed=4)
    np.save(tmp_path / "u8.npy", images)
    data = open_npy(tmp_path / "u8.npy")
    cfg = VAEConfig(input_shape=(3, 16, 16), family="conv", hidden=(8, 16), latent_dim=4,
                    blocks=1, norm="group", likelihood="discretized_logistic")
    train = TrainConfig(epochs=2, batch_size=16, seed=0, eval_importance_samples=0,
                        importance_samples=20)
    res = train_evaluate_export(data, cfg, train, str(tmp_path / "out"))
    s = res.summary
    assert s["likelihood_kind"] == "discrete"
    assert s["heldout_bits_per_dim"] == pytest.approx(
        -s["heldout_log_px"] / (3 * 16 * 16 * math.log(2)))
    assert s["onnx"]["decoder"]["outputs"] == ["mean", "log_scale", "loc"]
    z = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    x = images[res.train.val_rows[:6]].astype(np.float64) / 255
    session = ort.InferenceSession(res.onnx["decoder"].path,
                                   providers=["CPUExecutionProvider"])
    outputs = dict(zip(["mean", "log_scale", "loc"], session.run(None, {"z": z}), strict=True))
    assert outputs["mean"].min() >= 0 and outputs["mean"].max() <= 1
    got = log_px_given_z(x, outputs, cfg)
    with torch.no_grad():
        want = res.train.model.cpu().log_px_given_z(torch.from_numpy(x).float(),
                                                    torch.from_numpy(z)).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
