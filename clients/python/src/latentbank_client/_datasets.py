"""Datasets: registered from a numpy array, a file, a folder, a server-side source or a
builtin."""

from __future__ import annotations

import datetime as dt
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentbank_client._core import (
    NPY,
    Call,
    Plan,
    ident,
    npy_bytes,
    side_array,
    submission,
)
from latentbank_client._jobs import LINKED, Bound, Job, Resource, _wait
from latentbank_client.display import PNG, html_table
from latentbank_client.errors import InvalidInput
from latentbank_client.results import DatasetItems, build


@dataclass(kw_only=True)
class Dataset(Bound):
    """A registered dataset (server schema DatasetOut)."""

    id: int
    name: str = ""
    n_items: int = 0
    item_shape: list[int] = field(default_factory=list)
    dtype: str | None = None
    source_dtype: str | None = None
    source_format: str | None = None
    has_labels: bool = False
    size_bytes: int | None = None
    min_value: float | None = None
    max_value: float | None = None
    checksum: str | None = None
    source_uri: str | None = None
    created_at: dt.datetime | None = None
    mode: str | None = None
    ingest: dict[str, Any] | None = None

    def items(self, offset: int = 0, limit: int = 16) -> DatasetItems:
        """A page of the stored items (at most 256): keys, labels and values `x`."""
        def plan() -> Plan:
            response = yield Call("GET", f"/v1/datasets/{self.id}/items",
                                  params={"offset": int(offset), "limit": int(limit)})
            return build(DatasetItems, response.json())
        return self._run(plan())

    def thumbnails(self, offset: int = 0, n: int = 32, columns: int = 8) -> PNG:
        """A PNG grid of image items (shown inline by a notebook); Conflict when the
        items are not images."""
        def plan() -> Plan:
            response = yield Call("GET", f"/v1/datasets/{self.id}/thumbnails.png",
                                  params={"offset": offset, "n": n, "columns": columns})
            return PNG(response.content)
        return self._run(plan())

    def delete(self) -> None:
        """Delete the dataset (409 while a model or job uses it)."""
        return self._run(_delete(self.id))

    def _repr_html_(self) -> str:
        return html_table(f"latentbank dataset {self.id}: {self.name}", [
            ("items", self.n_items), ("item shape", "×".join(map(str, self.item_shape))),
            ("format", self.source_format), ("labels", "yes" if self.has_labels else "no"),
            ("range", f"{self.min_value:.4g} .. {self.max_value:.4g}"
             if self.min_value is not None and self.max_value is not None else None),
            ("source", self.source_uri), ("created", self.created_at)])


def get_dataset(client: Any, dataset_id: int) -> Plan:
    response = yield Call("GET", f"/v1/datasets/{dataset_id}")
    return build(Dataset, response.json(), client)


LINKED["dataset_id"] = get_dataset


def _delete(dataset_id: int) -> Plan:
    yield Call("DELETE", f"/v1/datasets/{dataset_id}")


def pack_folder(folder: Path, out: Path) -> Path:
    """The folder's regular files as an uncompressed .tar at `out`, file by file, under a
    top directory of the folder's name, sorted by path (as `latentbank datasets add` packs
    a folder: the server drops the top directory, so the keys are the paths in the
    folder). Links are left out."""
    names = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                names.append(path.relative_to(folder).as_posix())
    top = folder.resolve().name or "folder"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(folder, arcname=top, recursive=False)
        for name in sorted(names):
            tar.add(folder / name, arcname=f"{top}/{name}", recursive=False)
    return out


def _stem(filename: str) -> str:
    for suffix in (".tar.gz", ".tgz"):
        if filename.lower().endswith(suffix):
            return filename[:-len(suffix)]
    return Path(filename).stem


def _form(options: dict[str, Any]) -> dict[str, str]:
    form = {}
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            value = ("x".join(map(str, value)) if name == "image_size"
                     else ",".join(map(str, value)))
        form[name] = str(value)
    return form


class Datasets(Resource):
    """`client.datasets`: register, get, list, delete datasets."""

    def add(self, source: Any = None, *, labels: Any = None, keys: Any = None,
            name: str | None = None, uri: str | None = None, builtin: str | None = None,
            wait: bool = True, progress: Any = False, idempotency_key: str | None = None,
            **options: Any) -> Any:
        """Register a dataset and return it.

        `source` is a numpy array (n items of any shape, sent as .npy), the path of a
        file (.npy, .npz, .parquet, .csv, an archive of images, an image parquet, IDX) or
        of a folder of images (packed into a .tar on the fly). `labels` and `keys` (one
        per item: a sequence, an array or an .npy path) go with an array or a file.
        Without a source: `uri=` (a file or folder on the server, or an object under an
        allowed URL) or `builtin="digits"`. `options` are the API's reading options
        (`image_size`, `color`, `key_column`, `label_column`, `feature_columns`, ...).

        Small arrays register inside the request; archives, folders, large files and
        every `uri` become an ingest job, waited for (`progress=True` shows it) unless
        `wait=False`, which returns the `Job` instead."""
        given = [v is not None for v in (source, uri, builtin)]
        if sum(given) != 1:
            raise InvalidInput("give exactly one of a source (array, file or folder), "
                               "uri= and builtin=")
        if source is None:
            if labels is not None or keys is not None:
                raise InvalidInput("labels= and keys= go with an uploaded array or file")
            body = {"name": name or builtin or _stem(Path(uri or "data").name), "uri": uri,
                    "builtin": builtin, **options}
            call = Call("POST", "/v1/datasets",
                        json={k: v for k, v in body.items() if v is not None},
                        headers=submission(None, idempotency_key), timeout=None)
            return self._run(self._registered(call, wait, progress))
        return self._run(self._upload(source, labels, keys, name, options, wait, progress,
                                      idempotency_key))

    def _upload(self, source: Any, labels: Any, keys: Any, name: str | None,
                options: dict[str, Any], wait: bool, progress: Any,
                idempotency_key: str | None) -> Plan:
        files: dict[str, Any] = {}
        n_items = None
        with tempfile.TemporaryDirectory(prefix="latentbank-pack-") as tmp:
            if isinstance(source, np.ndarray | list | tuple):
                array = np.asarray(source)
                if array.dtype == object or not (np.issubdtype(array.dtype, np.number)
                                                 or array.dtype == np.bool_):
                    raise InvalidInput(f"the array must be numeric; got dtype {array.dtype}")
                if array.ndim < 2 or array.shape[0] == 0:
                    raise InvalidInput("the array must hold items along its first axis "
                                       f"(shape (n, ...) with n >= 1); got {list(array.shape)}")
                n_items = len(array)
                name = name or "array"
                data = npy_bytes(array)
                files["file"] = (f"{name}.npy", lambda: data, NPY)
            elif isinstance(source, str | os.PathLike):
                path = Path(source)
                if not path.exists():
                    raise InvalidInput(f"{str(path)!r} does not exist")
                if path.is_dir():
                    if labels is not None or keys is not None:
                        raise InvalidInput("labels= and keys= go with a file, not a folder")
                    name = name or path.resolve().name
                    path = pack_folder(path, Path(tmp) / f"{path.resolve().name}.tar")
                name = name or _stem(path.name)
                files["file"] = (path.name, lambda p=path: open(p, "rb"),  # noqa: SIM115
                                 "application/octet-stream")
            else:
                raise InvalidInput("the source must be a numpy array, a file path or a "
                                   f"folder path; got {type(source).__name__}")
            for field_name, value in (("labels", labels), ("keys", keys)):
                if value is not None:
                    data_part = side_array(value, field_name, n_items)
                    files[field_name] = (f"{field_name}.npy",
                                         lambda d=data_part: d, NPY)
            call = Call("POST", "/v1/datasets", files=files,
                        data=_form({"name": name, **options}),
                        headers=submission(None, idempotency_key), timeout=None)
            return (yield from self._registered(call, wait, progress))

    def _registered(self, call: Call, wait: bool, progress: Any) -> Plan:
        response = yield call
        answer = response.json()
        if response.status_code != 202:
            return build(Dataset, answer, self._client)
        job = build(Job, answer["job"], self._client)
        if not wait:
            return job
        final = yield from _wait(self._client, job, progress, None, 1.0)
        return (yield from get_dataset(self._client, final.dataset_id))

    def get(self, dataset_id: int) -> Dataset:
        """One dataset by id."""
        return self._run(get_dataset(self._client, ident(dataset_id, "dataset_id")))

    def __getitem__(self, dataset_id: int) -> Dataset:
        return self.get(dataset_id)

    def list(self, limit: int = 100, offset: int = 0) -> list[Dataset]:
        """Registered datasets, newest first."""
        def plan() -> Plan:
            response = yield Call("GET", "/v1/datasets",
                                  params={"limit": limit, "offset": offset})
            return [build(Dataset, d, self._client) for d in response.json()]
        return self._run(plan())

    def delete(self, dataset_id: int) -> None:
        """Delete a dataset."""
        return self._run(_delete(ident(dataset_id, "dataset_id")))
