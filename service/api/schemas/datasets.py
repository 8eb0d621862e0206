"""Datasets: registered rows, pages of items, registration by reference, and an ingest
accepted as a job."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.jobs import JobOut
from store.tables import Dataset


class DatasetOut(BaseModel):
    id: int
    name: str
    n_items: int
    item_shape: list[int]
    dtype: str
    source_dtype: str
    source_format: str
    has_labels: bool
    size_bytes: int
    min_value: float
    max_value: float
    checksum: str
    source_uri: str | None = None
    created_at: dt.datetime
    mode: Literal["sync"] | None = Field(
        None, description="on a registration: `sync`, registered inside the request (an "
                          "ingest job answers 202 with `mode: job` instead)")
    ingest: dict[str, Any] | None = Field(
        None, description="how the items were read: `format`, `options`, `image` (the "
                          "transform a query image goes through: color, size) and `report` "
                          "(items read, failed, skipped, and the first failures: key and "
                          "reason)")

    @classmethod
    def of(cls, d: Dataset) -> DatasetOut:
        source = d.source_uri
        if source and not source.startswith("builtin:"):
            source = "path:" + source.rsplit("/", 1)[-1]  # never the server's folders
        return cls(id=d.id, name=d.name, n_items=d.n_items, item_shape=list(d.item_shape),
                   dtype=d.dtype, source_dtype=d.source_dtype, source_format=d.source_format,
                   has_labels=d.has_labels, size_bytes=d.size_bytes, min_value=d.min_value,
                   max_value=d.max_value, checksum=d.checksum, source_uri=source,
                   created_at=d.created_at, ingest=d.ingest)


class DatasetItemsOut(BaseModel):
    dataset_id: int
    offset: int
    n: int
    item_shape: list[int]
    keys: list[str]
    labels: list[str | None]
    x: list[Any] = Field(description="the items' stored values (float32), item-shaped")


class DatasetByReference(BaseModel):
    """Register a source already on the server (a file or folder under an allowed root, or
    an object under an allowed URL: an ingest job, 202) or a builtin (in the request)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"name": "digits", "builtin": "digits"},
                     {"name": "mnist-train", "uri": "/data/mnist/train.npy"},
                     {"name": "photos", "uri": "s3://bucket/photos/", "image_size": 32,
                      "color": "rgb"}]})

    name: str = Field(min_length=1, max_length=200)
    uri: str | None = Field(None, max_length=4096)
    builtin: Literal["digits"] | None = None
    array: str | None = Field(None, max_length=200, description=".npz member holding the data")
    key_column: str | None = Field(None, max_length=200)
    label_column: str | None = Field(None, max_length=200)
    feature_columns: list[str] | None = None
    metadata_columns: list[str] | None = None
    format: str | None = Field(None, max_length=40, description="default: told by the "
                               "extension or contents (npy npz parquet csv images zip tar "
                               "webdataset image-parquet idx)")
    image_size: int | str | list[int] | None = Field(
        None, description="resize + centre crop: N, \"HxW\" or [H, W]; default: each "
                          "image's own size")
    color: str | None = Field(None, max_length=10, description="grey or rgb (default)")
    image_column: str | None = Field(None, max_length=200,
                                     description="parquet: the column of images")
    max_failure_share: float | None = Field(
        None, description="refuse the source when more than this share of its items "
                          "cannot be read (default: LATENTBANK_INGEST_MAX_FAILURE_SHARE)")

    def options(self) -> dict[str, Any]:
        """The reading options given (see ingest.requests.FIELDS)."""
        return self.model_dump(exclude={"name", "uri", "builtin"}, exclude_none=True)


class IngestAccepted(BaseModel):
    """A registration that runs as an ingest job (202): follow `job` (Location: the job);
    `job.dataset_id` names the dataset once it succeeded."""

    mode: Literal["job"] = "job"
    job: JobOut
    dataset: DatasetOut | None = None
