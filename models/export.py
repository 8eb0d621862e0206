"""ONNX export of the encoder (x -> mu, logvar) and decoder (z -> likelihood parameters).

Each file is self-contained (no external data), has a dynamic batch axis, named
inputs and outputs, and metadata_props describing the model. After writing, the file
verifies itself: `onnx.checker` must pass and onnxruntime must match torch within
1e-4 on random inputs at two batch sizes; any failure raises ExportError.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from models.checkpoint import sha256_file
from models.vae import VAE

OPSET = 18
TOLERANCE = 1e-4
Exporter = Literal["torchscript", "dynamo"]


class ExportError(RuntimeError):
    """The exported graph failed its checks; the file was not kept."""


class EncoderGraph(nn.Module):
    """x (B, *item) -> mu (B, D), logvar (B, D)."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.encode(x)


class DecoderGraph(nn.Module):
    """z (B, D) -> the likelihood's `output_names`, each (B, *item): probs, logits
    (Bernoulli); mean, probs, logits (continuous Bernoulli); mean, log_scale (Gaussian);
    mean, log_scale, loc (discretised logistic)."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.vae.likelihood.parameters_of(self.vae.decoder(z))


@dataclass(frozen=True)
class ExportedModel:
    path: str
    sha256: str
    input_name: str
    output_names: tuple[str, ...]
    max_abs_error: float


def model_metadata(vae: VAE, role: str) -> dict[str, str]:
    """metadata_props written into each file: what a server needs to call it."""
    cfg = vae.config
    return {
        "latentbank.role": role,
        "latentbank.likelihood": cfg.likelihood,
        "latentbank.activation": cfg.activation,
        "latentbank.latent_dim": str(cfg.latent_dim),
        "latentbank.item_shape": json.dumps(list(cfg.input_shape)),
        "latentbank.outputs": json.dumps(list(vae.likelihood.output_names)),
        "latentbank.config": json.dumps(cfg.to_dict(), sort_keys=True),
    }


def _torch_export(module: nn.Module, example: torch.Tensor, path: str, input_name: str,
                  output_names: tuple[str, ...], exporter: Exporter) -> None:
    # The exporters log progress lines that would flood a worker's log.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(module, (example,), path, input_names=[input_name],
                              output_names=list(output_names), dynamo=True, verbose=False,
                              external_data=False, opset_version=OPSET,
                              dynamic_shapes={input_name: {0: batch}})
        else:
            axes = {name: {0: "batch"} for name in (input_name, *output_names)}
            torch.onnx.export(module, (example,), path, input_names=[input_name],
                              output_names=list(output_names), dynamo=False, verbose=False,
                              opset_version=OPSET, dynamic_axes=axes)


def verify_onnx(path: str, module: nn.Module, input_name: str, input_shape: tuple[int, ...],
                output_names: tuple[str, ...], seed: int = 0) -> float:
    """Check the file with onnx.checker and compare onnxruntime with torch at batch 1 and 7.

    Returns the largest absolute difference; raises ExportError above tolerance.
    """
    import onnxruntime as ort

    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{os.path.basename(path)}: onnx.checker failed: {exc}") from None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got_names = tuple(o.name for o in session.get_outputs())
    if got_names != output_names:
        raise ExportError(f"{os.path.basename(path)}: outputs {got_names}, "
                          f"expected {output_names}")
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in (1, 7):
        x = torch.rand((batch, *input_shape), generator=generator)
        if input_name == "z":
            x = torch.randn((batch, *input_shape), generator=generator)
        with torch.no_grad():
            expected = module(x)
        got = session.run(None, {input_name: x.numpy()})
        for name, want, have in zip(output_names, expected, got, strict=True):
            if have.shape != tuple(want.shape):
                raise ExportError(f"{os.path.basename(path)}: output {name} has shape "
                                  f"{have.shape} at batch {batch}, torch gives "
                                  f"{tuple(want.shape)}")
            err = float(np.max(np.abs(have - want.numpy()))) if have.size else 0.0
            scale = max(1.0, float(np.max(np.abs(want.numpy()))) if have.size else 1.0)
            if not np.isfinite(err) or err > TOLERANCE * scale:
                raise ExportError(f"{os.path.basename(path)}: output {name} differs from "
                                  f"torch by {err:.3g} at batch {batch} "
                                  f"(tolerance {TOLERANCE * scale:.3g})")
            worst = max(worst, err)
    return worst


def export_module(module: nn.Module, example: torch.Tensor, path: str, input_name: str,
                  output_names: tuple[str, ...], metadata: dict[str, str],
                  exporter: Exporter = "dynamo") -> ExportedModel:
    """Export, stamp metadata, verify, then move into place; nothing is left on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".onnx-", suffix=".onnx")
    os.close(fd)
    try:
        _torch_export(module, example, tmp, input_name, output_names, exporter)
        proto = onnx.load(tmp, load_external_data=False)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            raise ExportError("exporter wrote external data; refusing a multi-file model")
        del proto.metadata_props[:]
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, tmp)
        error = verify_onnx(tmp, module, input_name, tuple(example.shape[1:]), output_names)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportedModel(path, sha256_file(path), input_name, output_names, error)


@torch.no_grad()
def export_vae(vae: VAE, directory: str, exporter: Exporter = "dynamo",
               ) -> dict[str, ExportedModel]:
    """Write `encoder.onnx` and `decoder.onnx` into `directory`, verified.

    `dynamo` (default) is torch's maintained exporter (~2 s a file on a CPU core);
    `torchscript` is the deprecated one (~0.2 s). Both give the same interface and
    pass the same checks.
    """
    vae = copy.deepcopy(vae).to("cpu").eval()  # leave the caller's model where it is
    cfg = vae.config
    encoder = export_module(
        EncoderGraph(vae).eval(), torch.rand(2, *cfg.input_shape),
        os.path.join(directory, "encoder.onnx"), "x", ("mu", "logvar"),
        model_metadata(vae, "encoder"), exporter)
    decoder = export_module(
        DecoderGraph(vae).eval(), torch.randn(2, cfg.latent_dim),
        os.path.join(directory, "decoder.onnx"), "z", vae.likelihood.output_names,
        model_metadata(vae, "decoder"), exporter)
    return {"encoder": encoder, "decoder": decoder}
