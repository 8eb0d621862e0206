"""The artifact store: datasets, checkpoints and ONNX files under one fsspec root (`file://`,
`s3://`), keys confined to it, and every write returning the sha256 callers record."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec

from store.errors import NotFound, PathNotAllowed

KEY_PATTERN = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
BLOCK = 4 << 20


# The key layout: this module is the only place that spells it out. Rows store the URIs
# of the files that count; readers open files by those URIs, never by a guessed key.
def dataset_key(dataset_id: int, name: str | None = "data.npy") -> str:
    """A dataset's canonical `.npy` (`name`), or its folder (`name=None`)."""
    folder = f"datasets/{int(dataset_id)}"
    return check_key(folder if name is None else f"{folder}/{name}")


def model_key(model_id: int, attempt: int, name: str) -> str:
    """Where a training attempt writes its files: each attempt its own folder, so an
    attempt that lost its lease can never overwrite the files a newer attempt recorded.
    The model row stores the URIs of the files that count."""
    return check_key(f"models/{int(model_id)}/attempt-{int(attempt)}/{name}")


def upload_key(token: str, name: str | None = None) -> str:
    """A file uploaded for an ingest job (`name`), or the folder of the job's uploads
    (`name=None`): the API writes it, the job reads it and removes the folder at its end.
    In the artifact store, so a worker on another host reads it as the API wrote it."""
    folder = f"uploads/{token}"
    return check_key(folder if name is None else f"{folder}/{name}")


def check_key(key: str) -> str:
    """Return `key` if it is a safe relative key; PathNotAllowed otherwise."""
    if not isinstance(key, str) or not key or len(key) > 512:
        raise PathNotAllowed("artifact key must be a non-empty string of at most 512 chars")
    if not KEY_PATTERN.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise PathNotAllowed(f"artifact key {key!r} is not a plain relative path "
                             "(letters, digits, '.', '_', '-' and '/' separators; no '..')")
    return key


class ArtifactStore:
    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.root = root.rstrip("/")
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                   else (self.fs.protocol,))
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)

    def path(self, key: str) -> str:
        """The store-internal path of `key` (inside the root by construction)."""
        return f"{self.root}/{check_key(key)}"

    def uri(self, key: str) -> str:
        return f"{self.url}/{check_key(key)}"

    def key_of(self, uri: str) -> str:
        """The key of a URI this store made (`uri(key)`); PathNotAllowed for any other."""
        prefix = self.url + "/"
        if not isinstance(uri, str) or not uri.startswith(prefix):
            raise PathNotAllowed(f"{uri!r} is not in the artifact store {self.url}")
        return check_key(uri[len(prefix):])

    def local_path(self, key: str) -> str | None:
        """A filesystem path for local stores (memory-mappable), else None."""
        return self.path(key) if self.is_local else None

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def size(self, key: str) -> int:
        try:
            return int(self.fs.size(self.path(key)))
        except FileNotFoundError:
            raise NotFound(f"artifact {key!r} does not exist") from None

    def put_file(self, local_path: str, key: str) -> str:
        """Copy a local file to `key` (write to a temporary name, then move); returns sha256."""
        digest = sha256_of_file(local_path)
        target = self.path(key)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        if self.is_local:
            tmp = f"{target}.part"
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, target)
        else:
            self.fs.put_file(local_path, target)
        return digest

    def put_local_file(self, local_path: str, key: str) -> str:
        """Like put_file, but a local store moves the file instead of copying it."""
        if not self.is_local:
            digest = self.put_file(local_path, key)
            os.unlink(local_path)
            return digest
        digest = sha256_of_file(local_path)
        target = self.path(key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.replace(local_path, target)
        except OSError:  # another filesystem
            shutil.copyfile(local_path, f"{target}.part")
            os.replace(f"{target}.part", target)
            os.unlink(local_path)
        return digest

    def put_bytes(self, data: bytes, key: str) -> str:
        target = self.path(key)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(f"{target}.part" if self.is_local else target, "wb") as f:
            f.write(data)
        if self.is_local:
            os.replace(f"{target}.part", target)
        return hashlib.sha256(data).hexdigest()

    def get_file(self, key: str, local_path: str, sha256: str | None = None) -> str:
        """Download `key` to `local_path`, verifying `sha256` when given.

        The file appears whole or not at all: it is written under a name of this call's
        own, then renamed over `local_path`. Processes sharing a cache folder (pool
        children, API processes) may download the same file at once, and one of them may
        have the previous copy memory-mapped (safetensors, np.load): overwriting it in
        place would truncate their mapping (SIGBUS); a rename leaves it intact."""
        tmp = f"{local_path}.{os.getpid()}-{secrets.token_hex(4)}.part"
        try:
            try:
                self.fs.get_file(self.path(key), tmp)
            except FileNotFoundError:
                raise NotFound(f"artifact {key!r} does not exist") from None
            if sha256 is not None and sha256_of_file(tmp) != sha256:
                raise OSError(f"artifact {key!r} does not match its recorded sha256")
            os.replace(tmp, local_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return local_path

    @contextmanager
    def open(self, key: str, mode: str = "rb") -> Iterator[IO[bytes]]:
        try:
            with self.fs.open(self.path(key), mode) as f:
                yield f
        except FileNotFoundError:
            raise NotFound(f"artifact {key!r} does not exist") from None

    def delete(self, key: str) -> None:
        """Remove `key` or a whole prefix; a missing key is not an error."""
        path = self.path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self.open(key) as f:
            for block in iter(lambda: f.read(BLOCK), b""):
                digest.update(block)
        return digest.hexdigest()


def sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
