"""Checkpoints: config plus weights in one safetensors file, no pickle anywhere.

Tensors are stored under `model/`, `best/` (early stopping's best weights) and
`optim/<param>/<key>` (Adam's moments and step); everything else (configs, epoch,
history, optimiser hyper-parameters) is JSON in the file's metadata. Loading a
file therefore never executes code from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.config import ConfigError, TrainConfig, VAEConfig
from models.vae import VAE

FORMAT = "latentbank.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, of an unknown format, or does not fit its config."""


@dataclass
class Checkpoint:
    """Everything needed to rebuild a model, and to resume its training exactly."""

    model_config: VAEConfig
    model_state: dict[str, torch.Tensor]
    train_config: TrainConfig | None = None
    optimizer_state: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    # epoch (completed epochs), step, best_val_elbo, best_epoch, bad_epochs, ...
    progress: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split("/", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entries in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    groups = meta["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Checkpoint) -> str:
    """Write `checkpoint` atomically (temp file, then rename); returns its sha256."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous().clone()
               for k, v in checkpoint.model_state.items()}
    if checkpoint.best_state is not None:
        tensors.update({f"best/{k}": v.detach().cpu().contiguous().clone()
                        for k, v in checkpoint.best_state.items()})
    optimizer_meta = None
    if checkpoint.optimizer_state is not None:
        optim_tensors, optimizer_meta = _flatten_optimizer(checkpoint.optimizer_state)
        tensors.update(optim_tensors)
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(checkpoint.model_config.to_dict()),
        "train_config": json.dumps(checkpoint.train_config.to_dict()
                                   if checkpoint.train_config else None),
        "optimizer": json.dumps(optimizer_meta),
        "progress": json.dumps(checkpoint.progress),
        "history": json.dumps(checkpoint.history),
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ckpt-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return sha256_file(path)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; CheckpointError if it is not one."""
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "best": {}, "optim": {}}
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                prefix, _, rest = name.partition("/")
                if prefix not in groups:
                    raise CheckpointError(f"unexpected tensor {name!r} in checkpoint")
                groups[prefix][rest if prefix != "optim" else name] = f.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"not a readable safetensors checkpoint: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"unknown checkpoint format {metadata.get('format')!r}; "
                              f"expected {FORMAT!r}")
    try:
        model_config = VAEConfig.from_dict(json.loads(metadata["model_config"]))
        train_dict = json.loads(metadata["train_config"])
        train_config = TrainConfig.from_dict(train_dict) if train_dict else None
        optimizer_meta = json.loads(metadata["optimizer"])
        progress = json.loads(metadata["progress"])
        history = json.loads(metadata["history"])
    except (KeyError, json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint metadata is invalid: {exc}") from None
    optimizer_state = (_unflatten_optimizer(groups["optim"], optimizer_meta)
                       if optimizer_meta is not None else None)
    return Checkpoint(model_config, groups["model"], train_config, optimizer_state,
                      groups["best"] or None, progress, history)


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> VAE:
    """Rebuild the VAE of a checkpoint with its weights, in eval mode."""
    checkpoint = load_checkpoint(path)
    model = VAE(checkpoint.model_config)
    try:
        model.load_state_dict(checkpoint.model_state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit the checkpoint's config: {exc}") from None
    return model.to(device).eval()
