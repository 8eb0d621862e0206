"""Artifacts over s3:// (s3fs) against a real S3-compatible server."""

import boto3
import numpy as np
import pytest

from ingest.arrays import register_file
from store.datasets import dataset_array
from store.errors import NotFound, PathNotAllowed
from store.settings import Settings, open_artifacts


@pytest.fixture
def s3_store(s3_endpoint, tmp_path):
    bucket = f"latentbank-{tmp_path.name.lower().replace('_', '-')[:40]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    settings = Settings(data_dir=tmp_path / "data", artifacts=f"s3://{bucket}/prefix",
                        artifacts_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    return settings, open_artifacts(settings)


def test_s3_round_trip_with_checksum(s3_store, tmp_path):
    _, store = s3_store
    assert not store.is_local and store.local_path("a/b") is None
    digest = store.put_bytes(b"onnx bytes", "models/7/decoder.onnx")
    assert store.exists("models/7/decoder.onnx") and store.size("models/7/decoder.onnx") == 10
    assert store.uri("models/7/decoder.onnx").startswith("s3://")
    store.get_file("models/7/decoder.onnx", str(tmp_path / "d.onnx"), sha256=digest)
    assert (tmp_path / "d.onnx").read_bytes() == b"onnx bytes"
    with pytest.raises(PathNotAllowed):
        store.put_bytes(b"x", "../escape")
    store.delete("models/7")
    with pytest.raises(NotFound):
        store.size("models/7/decoder.onnx")


def test_dataset_registered_into_s3_reads_back(s3_store, db, tmp_path):
    settings, store = s3_store
    data = np.random.default_rng(0).random((300, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    ds = register_file(db, store, settings, "s3-dataset", str(tmp_path / "x.npy")).dataset
    assert store.exists(ds.artifact_key)
    np.testing.assert_array_equal(dataset_array(store, ds, str(tmp_path / "cache")), data)
