"""Train -> evaluate held-out -> export ONNX, on a local array, without database or broker.

This is the body of a training job; the Celery task (later) wraps it with job rows,
artifact uploads and metric writes. Run directly it is the offline demo:

    python -m workers.pipeline --builtin digits --out out/demo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.checkpoint import Checkpoint
from models.config import TrainConfig, VAEConfig
from models.data import load_digits_dataset
from models.evaluate import Evaluation, evaluate
from models.export import ExportedModel, export_vae
from models.trainer import Callback, CheckpointEachEpoch, Trainer, TrainResult

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    train: TrainResult
    heldout: Evaluation
    onnx: dict[str, ExportedModel]
    checkpoint_path: str
    summary: dict[str, Any]


def train_evaluate_export(data: np.ndarray, model_config: VAEConfig, train_config: TrainConfig,
                          out_dir: str, callbacks: Sequence[Callback] = (),
                          resume: Checkpoint | None = None) -> PipelineResult:
    """Train with a checkpoint each epoch, evaluate the validation split with K importance
    samples, export and verify encoder and decoder; write `summary.json` into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    checkpoint_path = os.path.join(out_dir, "checkpoint.safetensors")
    trainer = Trainer(model_config, train_config,
                      callbacks=[CheckpointEachEpoch(checkpoint_path), *callbacks])
    result = trainer.fit(data, resume=resume)
    started = time.perf_counter()
    rows = result.val_rows if len(result.val_rows) else result.train_rows
    heldout = evaluate(result.model, data, rows,
                       importance_samples=train_config.importance_samples,
                       batch_size=train_config.eval_batch_size, seed=train_config.seed,
                       device=result.device)
    eval_seconds = time.perf_counter() - started
    onnx_files = export_vae(result.model, out_dir)
    n_train_samples = len(result.train_rows) * (result.epochs_run - (
        resume.progress.get("epoch", 0) if resume else 0))
    summary = {
        "heldout_split": "val" if len(result.val_rows) else "train",
        **{f"heldout_{k}": v for k, v in heldout.summary().items()},
        "kl_per_dim": heldout.kl_per_dim.tolist(),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "device": result.device,
        "train_seconds": result.seconds,
        "train_samples_per_second": n_train_samples / max(result.seconds, 1e-9),
        "eval_seconds": eval_seconds,
        "onnx": {role: {"sha256": f.sha256, "max_abs_error": f.max_abs_error,
                        "outputs": list(f.output_names)} for role, f in onnx_files.items()},
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"summary": summary, "history": result.history,
                   "model": model_config.to_dict(), "training": train_config.to_dict()},
                  f, indent=2)
    return PipelineResult(result, heldout, onnx_files, checkpoint_path, summary)


def main(argv: Sequence[str] | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from store.plots import plot_latents, plot_training_curves, save_image_grid

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builtin", choices=["digits"], default="digits")
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--importance-samples", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    console = Console()

    images, labels = load_digits_dataset()
    model_cfg = VAEConfig(input_shape=images.shape[1:], latent_dim=args.latent_dim,
                          hidden=(128, 64), likelihood="bernoulli")
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=2e-3, seed=0,
                            importance_samples=args.importance_samples,
                            kl_warmup_epochs=10, early_stopping_patience=10)
    with console.status("training on digits..."):
        res = train_evaluate_export(images, model_cfg, train_cfg, args.out)

    import onnxruntime as ort

    out = os.path.abspath(args.out)
    decoder = ort.InferenceSession(res.onnx["decoder"].path, providers=["CPUExecutionProvider"])
    encoder = ort.InferenceSession(res.onnx["encoder"].path, providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((64, args.latent_dim)).astype(np.float32)
    (probs,) = decoder.run(None, {"z": z})
    val = res.train.val_rows
    mu, _ = encoder.run(None, {"x": images[val]})
    (recon,) = decoder.run(None, {"z": mu})
    files = {
        "training curves": plot_training_curves(res.train.history,
                                                os.path.join(out, "curves.png")),
        "latent scatter (PCA of mu)": plot_latents(mu, labels[val],
                                                   os.path.join(out, "latent.png")),
        "prior samples": save_image_grid(probs, os.path.join(out, "samples.png")),
        "reconstructions": save_image_grid(
            np.concatenate([images[val][:32], recon[:32]]), os.path.join(out, "recon.png")),
    }
    s = res.summary
    table = Table(title="VAE on scikit-learn digits (nats; higher is better)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    max_onnx_error = max(o["max_abs_error"] for o in s["onnx"].values())
    for name, value in [
        ("held-out items", s["heldout_n_items"]),
        ("held-out ELBO", f"{s['heldout_elbo']:.3f}"),
        ("held-out reconstruction E_q[log p(x|z)]", f"{s['heldout_reconstruction']:.3f}"),
        ("held-out KL(q(z|x) || p(z))", f"{s['heldout_kl']:.3f}"),
        (f"held-out log p(x) (K={s['heldout_importance_samples']})", f"{s['heldout_log_px']:.3f}"),
        ("active units", f"{s['heldout_active_units']} / {args.latent_dim}"),
        ("epochs (best)", f"{s['epochs_run']} ({s['best_epoch']})"),
        ("training", f"{s['train_seconds']:.1f} s, {s['train_samples_per_second']:.0f} items/s"),
        ("ONNX max |onnxruntime - torch|", f"{max_onnx_error:.2e}"),
    ]:
        table.add_row(escape(name), str(value))
    console.print(table)
    for name, path in {**files, "encoder.onnx": res.onnx["encoder"].path,
                       "decoder.onnx": res.onnx["decoder"].path,
                       "checkpoint": res.checkpoint_path,
                       "summary + history": os.path.join(out, "summary.json")}.items():
        console.print(f"  {name:28s} {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
