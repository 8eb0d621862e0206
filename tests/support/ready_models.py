"""Ready models without a training job: an untrained VAE's files registered as a model."""

import os
import time


def store_untrained_model(db, settings, tmp, model):
    """A dataset of 64 random items, and a ready model (config `model`) whose files (ONNX and
    checkpoint) are a fresh, untrained VAE's: serving tests and benches need no training job.
    Returns (model id, the decoder's local .onnx path)."""
    import numpy as np

    from ingest.arrays import register_file
    from models.checkpoint import Checkpoint, save_checkpoint
    from models.config import TrainConfig, VAEConfig
    from models.export import export_vae
    from models.vae import VAE
    from store.artifacts import model_key
    from store.settings import open_artifacts
    from store.tables import Model

    data = os.path.join(tmp, "data.npy")
    np.save(data, np.random.default_rng(0).random((64, *model["input_shape"]), dtype=np.float32))
    artifacts = open_artifacts(settings)
    name = f"untrained-{os.getpid()}-{time.monotonic_ns()}"
    dataset = register_file(db, artifacts, settings, name, data).dataset
    config = VAEConfig.from_dict(model)
    vae = VAE(config)
    files = export_vae(vae, tmp)
    checkpoint = os.path.join(tmp, "checkpoint.safetensors")
    save_checkpoint(checkpoint, Checkpoint(config, vae.state_dict()))
    with db.session() as s:
        row = Model(dataset_id=dataset.id, status="ready",
                    config={"model": config.to_dict(), "training": TrainConfig().to_dict()})
        s.add(row)
        s.flush()
        model_id = row.id
    keys = {role: model_key(model_id, 1, f"{role}.onnx") for role in files}
    shas = {role: artifacts.put_file(f.path, keys[role]) for role, f in files.items()}
    artifacts.put_file(checkpoint, model_key(model_id, 1, "checkpoint.safetensors"))
    with db.session() as s:
        model = s.get(Model, model_id)
        model.checkpoint_uri = artifacts.uri(model_key(model_id, 1, "checkpoint.safetensors"))
        model.encoder_sha256, model.decoder_sha256 = shas["encoder"], shas["decoder"]
        model.encoder_uri = artifacts.uri(keys["encoder"])
        model.decoder_uri = artifacts.uri(keys["decoder"])
    return model_id, files["decoder"].path
