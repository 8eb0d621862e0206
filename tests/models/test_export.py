"""ONNX export: onnxruntime and the reference evaluator against torch."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

import models.export as export_mod
from models.config import VAEConfig
from models.export import ExportError, export_module, export_vae, verify_onnx
from models.vae import VAE

CONFIGS = {
    "mlp-bernoulli-8x8": VAEConfig(input_shape=(1, 8, 8), latent_dim=5, hidden=(32, 16)),
    "mlp-gaussian-flat": VAEConfig(input_shape=(20,), latent_dim=3, hidden=(16,),
                                   likelihood="gaussian"),
    "conv-bernoulli-28x28": VAEConfig(input_shape=(1, 28, 28), family="conv", hidden=(8, 16),
                                      latent_dim=6),
    "conv-gaussian-3x32x32": VAEConfig(input_shape=(3, 32, 32), family="conv", hidden=(8, 16),
                                       latent_dim=4, likelihood="gaussian"),
    "mlp-continuous-bernoulli-8x8": VAEConfig(input_shape=(1, 8, 8), latent_dim=4,
                                              hidden=(16,), likelihood="continuous_bernoulli"),
    "conv-fixed-scale-1x8x8": VAEConfig(input_shape=(1, 8, 8), family="conv", hidden=(4,),
                                        likelihood="gaussian", gaussian_scale="fixed",
                                        fixed_log_scale=-1.5),
    "conv-dlogistic-residual-group-3x32x32": VAEConfig(
        input_shape=(3, 32, 32), family="conv", hidden=(8, 16), latent_dim=4, blocks=1,
        norm="group", likelihood="discretized_logistic"),
    "conv-residual-3x64x64": VAEConfig(input_shape=(3, 64, 64), family="conv",
                                       hidden=(4, 8, 8), latent_dim=3, blocks=2,
                                       likelihood="gaussian"),
    # the IWAE paper's nonlinearity, and one the dynamo and torchscript exporters lower
    # differently (GELU: Erf)
    "mlp-tanh-8x8": VAEConfig(input_shape=(1, 8, 8), latent_dim=5, hidden=(32, 16),
                              activation="tanh"),
    "conv-gelu-residual-1x8x8": VAEConfig(input_shape=(1, 8, 8), family="conv", hidden=(4,),
                                          latent_dim=3, blocks=1, activation="gelu"),
    "mlp-dlogistic-flat": VAEConfig(input_shape=(7,), latent_dim=2, hidden=(8,),
                                    likelihood="discretized_logistic"),
}


def perturb(model):
    """Learned-looking parameters: a residual block starts as the identity (its second
    convolution at zero) and GroupNorm as the plain normalisation; parity must hold for
    what training makes of them, so every parameter moves."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))


def torch_outputs(model, cfg, x, z):
    with torch.no_grad():
        mu, logvar = model.encode(torch.from_numpy(x))
        loc = model.decoder(torch.from_numpy(z))
        if cfg.likelihood == "bernoulli":
            dec = [torch.sigmoid(loc), loc]
        elif cfg.likelihood == "continuous_bernoulli":
            # torch's own continuous Bernoulli (its mean is not lambda), not ours
            cb = torch.distributions.ContinuousBernoulli(logits=loc.double())
            dec = [cb.mean.float(), torch.sigmoid(loc), loc]
        elif cfg.likelihood == "discretized_logistic":
            # mean: the location clamped to [0, 1]; log_scale: the per-channel (or
            # per-value, flat) parameter broadcast to the item
            scale = model.likelihood.log_scale_param.clamp(min=cfg.min_log_scale)
            dec = [torch.from_numpy(np.clip(loc.numpy(), 0.0, 1.0)),
                   torch.broadcast_to(scale, loc.shape), loc]
        else:
            dec = [loc, model.likelihood.log_scale().expand_as(loc)]
    return [mu.numpy(), logvar.numpy()], [d.numpy() for d in dec]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_matches_torch_in_onnxruntime_and_reference_evaluator(tmp_path, name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = VAE(cfg).eval()
    with torch.no_grad():  # a non-trivial learned scale
        if cfg.likelihood == "discretized_logistic" or (
                cfg.likelihood == "gaussian" and cfg.gaussian_scale == "learned"):
            model.likelihood.log_scale_param.uniform_(-1, 1)
    if cfg.blocks or cfg.norm != "none":
        perturb(model)
    files = export_vae(model, str(tmp_path), exporter="torchscript")
    assert sorted(os.listdir(tmp_path)) == ["decoder.onnx", "encoder.onnx"]
    rng = np.random.default_rng(1)
    for batch in (1, 9):  # the batch axis is dynamic
        x = rng.random((batch, *cfg.input_shape), dtype=np.float32)
        z = rng.normal(size=(batch, cfg.latent_dim)).astype(np.float32)
        want_enc, want_dec = torch_outputs(model, cfg, x, z)
        for role, feed, want in (("encoder", {"x": x}, want_enc),
                                 ("decoder", {"z": z}, want_dec)):
            path = files[role].path
            got_ort = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
                None, feed)
            got_ref = ReferenceEvaluator(path).run(None, feed)
            for w, a, b in zip(want, got_ort, got_ref, strict=True):
                assert a.shape == w.shape == b.shape
                np.testing.assert_allclose(a, w, atol=1e-4, rtol=1e-4)
                np.testing.assert_allclose(b, w, atol=1e-4, rtol=1e-4)
    dec = onnx.load(files["decoder"].path)
    meta = {p.key: p.value for p in dec.metadata_props}
    assert meta["latentbank.likelihood"] == cfg.likelihood
    assert meta["latentbank.activation"] == cfg.activation
    assert int(meta["latentbank.latent_dim"]) == cfg.latent_dim
    assert json.loads(meta["latentbank.item_shape"]) == list(cfg.input_shape)
    assert VAEConfig.from_dict(json.loads(meta["latentbank.config"])) == cfg
    assert [o.name for o in dec.graph.output] == list(files["decoder"].output_names)
    assert [i.name for i in dec.graph.input] == ["z"]


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_interface(tmp_path):
    cfg = CONFIGS["conv-gaussian-3x32x32"]
    torch.manual_seed(0)
    model = VAE(cfg).eval()
    files = export_vae(model, str(tmp_path))  # default exporter
    assert sorted(os.listdir(tmp_path)) == ["decoder.onnx", "encoder.onnx"]  # no external data
    z = np.random.default_rng(0).normal(size=(4, cfg.latent_dim)).astype(np.float32)
    _, want = torch_outputs(model, cfg, np.zeros((1, *cfg.input_shape), np.float32), z)
    got = ReferenceEvaluator(files["decoder"].path).run(None, {"z": z})
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_export_leaves_the_callers_model_untouched(tmp_path):
    model = VAE(CONFIGS["mlp-bernoulli-8x8"]).train()
    export_vae(model, str(tmp_path), exporter="torchscript")
    assert model.training


def test_verification_failure_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    class Shifted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.offset = torch.nn.Linear(3, 2), 0.0

        def forward(self, x):
            return (self.lin(x) + self.offset,)

    module = Shifted()
    original = export_mod.verify_onnx

    def verify_after_drift(*args, **kwargs):
        module.offset = 1e-3  # torch now disagrees with the exported graph
        return original(*args, **kwargs)

    monkeypatch.setattr(export_mod, "verify_onnx", verify_after_drift)
    with pytest.raises(ExportError, match="differs from torch by 0.001"):
        export_module(module, torch.rand(2, 3), str(tmp_path / "m.onnx"), "x", ("y",), {},
                      "torchscript")
    assert os.listdir(tmp_path) == []


def test_checker_failure_is_an_error(tmp_path):
    path = str(tmp_path / "bad.onnx")
    with open(path, "wb") as f:
        f.write(b"not an onnx model")
    with pytest.raises(ExportError, match=r"onnx\.checker failed"):
        verify_onnx(path, torch.nn.Identity(), "x", (3,), ("y",))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conv-dlogistic-residual-group-3x32x32",
                                  "conv-residual-3x64x64", "mlp-tanh-8x8",
                                  "conv-gelu-residual-1x8x8"])
def test_dynamo_exports_residual_blocks_and_group_norm(tmp_path, name):
    """The default exporter (what training jobs use) on the residual network with GroupNorm,
    the discretised logistic's three outputs and the other activations, through
    onnxruntime and the reference evaluator."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = VAE(cfg).eval()
    perturb(model)
    files = export_vae(model, str(tmp_path))
    rng = np.random.default_rng(2)
    x = rng.random((3, *cfg.input_shape), dtype=np.float32)
    z = rng.normal(size=(3, cfg.latent_dim)).astype(np.float32)
    want_enc, want_dec = torch_outputs(model, cfg, x, z)
    for role, feed, want in (("encoder", {"x": x}, want_enc), ("decoder", {"z": z}, want_dec)):
        path = files[role].path
        for got in (ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
                None, feed), ReferenceEvaluator(path).run(None, feed)):
            for w, g in zip(want, got, strict=True):
                np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
