"""A small HTTP client for the latentbank API (what the CLI verbs and the demo use).

Where it finds the API, and which key goes there. A key is sent only to a URL the user
gave or to the stack of the CLI's own data folder, never to a URL read from elsewhere:

- `url` / `LATENTBANK_URL` (the user's): with `key` / `LATENTBANK_API_KEY`; without one,
  with the local stack's `admin.key` only if that URL is the stack's own;
- else the stack that `latentbank up` of this user runs from `LATENTBANK_DATA_DIR` (its
  `stack.json`, trusted only as `service.cli.stack.read_stack` says): its URL, with the
  user's key or else its `admin.key`;
- else http://127.0.0.1:8000 without a key (a user's key is withheld: set
  LATENTBANK_URL to send it there).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

NPY = "application/x-npy"
TERMINAL = ("succeeded", "failed", "cancelled")


class ClientError(Exception):
    """A failed call, with a one-line reason; `exit_code` 1 = the API said no,
    3 = the API could not be reached."""

    def __init__(self, message: str, exit_code: int = 1, status: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status


def _data_dir() -> Path:
    return Path(os.environ.get("LATENTBANK_DATA_DIR", ".latentbank"))


def resolve(url: str | None = None, key: str | None = None) -> tuple[str, str | None]:
    """The API's URL and the key sent to it, by the rules in this module's docstring."""
    from service.cli.stack import key_file, read_stack

    url = url or os.environ.get("LATENTBANK_URL")
    key = key or os.environ.get("LATENTBANK_API_KEY")
    data_dir = _data_dir()
    running = read_stack(data_dir)
    own = str(running["url"]).rstrip("/") if running else None
    if url:
        url = url.rstrip("/")
    elif own:
        url = own
    else:
        return "http://127.0.0.1:8000", None
    if not key and url == own:
        try:
            key = key_file(data_dir).read_text().strip() or None
        except OSError:
            key = None
    return url, key


def reason(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip().splitlines()[0] if response.text.strip() else ""
    return f"{response.status_code} {response.reason_phrase}: {message}".rstrip(": ")


class Client:
    def __init__(self, url: str | None = None, key: str | None = None,
                 timeout: float = 60.0) -> None:
        self.url, self.key = resolve(url, key)
        # the user's key, not sent to a URL the user did not give (see the docstring)
        self.withheld = self.key is None and bool(key or os.environ.get("LATENTBANK_API_KEY"))
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach the latentbank API at {self.url} ({exc}); start "
                              f"it with `latentbank up` or set LATENTBANK_URL", 3) from None
        if response.status_code >= 400:
            why = reason(response)
            if response.status_code == 401 and self.withheld:
                why += (f" (LATENTBANK_API_KEY is sent only to the URL given with it: set "
                        f"LATENTBANK_URL={self.url} to send it there)")
            raise ClientError(why, 1, response.status_code)
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()

    # --- datasets -------------------------------------------------------------------
    def add_dataset(self, *, path: Path | None = None, uri: str | None = None,
                    builtin: str | None = None, name: str | None = None,
                    labels: Path | None = None, keys: Path | None = None,
                    idempotency_key: str | None = None, **options: Any) -> dict[str, Any]:
        """Upload a file or archive, register a source on the server, or a builtin
        dataset. The answer is the dataset (`mode: sync`) or its ingest job (`mode: job`,
        202: `{"mode", "job", "dataset"}`)."""
        options = {k: v for k, v in options.items() if v is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if path is None:
            body = {"name": name or builtin or Path(uri or "data").stem,
                    "uri": uri, "builtin": builtin, **options}
            return self.post("/v1/datasets", json={k: v for k, v in body.items()
                                                   if v is not None}, headers=headers)
        form = {"name": name or dataset_name(path.name),
                **{k: ",".join(v) if isinstance(v, list) else str(v)
                   for k, v in options.items()}}
        with contextlib.ExitStack() as opened:
            files = {field: (p.name, opened.enter_context(open(p, "rb")))
                     for field, p in (("file", path), ("labels", labels), ("keys", keys)) if p}
            return self.post("/v1/datasets", data=form, files=files, timeout=None,
                             headers=headers)

    # --- jobs -----------------------------------------------------------------------
    def events(self, job_id: int) -> Iterator[dict[str, Any]]:
        """The job as it changes (server-sent events), ending with its final state.
        Reconnects when the stream breaks; falls back to polling if it cannot."""
        failures = 0
        while True:
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events",
                                      timeout=httpx.Timeout(60, read=None)) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise ClientError(reason(response), 1, response.status_code)
                    event = None
                    for line in response.iter_lines():
                        if line.startswith("event:"):
                            event = line.split(":", 1)[1].strip()
                        elif line.startswith("data:"):
                            job = json.loads(line.split(":", 1)[1])
                            failures = 0
                            yield job
                            if event == "end" or job["status"] in TERMINAL:
                                return
            except httpx.TransportError:
                failures += 1
                if failures > 5:
                    raise ClientError(f"lost the API at {self.url} while watching job "
                                      f"{job_id}", 3) from None
                time.sleep(min(2 ** failures, 10))

    # --- arrays ---------------------------------------------------------------------
    def post_array(self, path: str, accept: str, **kwargs: Any) -> bytes:
        headers = {**kwargs.pop("headers", {}), "Accept": accept}
        return self.request("POST", path, headers=headers, **kwargs).content


def dataset_name(filename: str) -> str:
    """A dataset's default name: the file's without its extension (both of `.tar.gz`)."""
    for suffix in (".tar.gz", ".tgz"):
        if filename.lower().endswith(suffix):
            return filename[:-len(suffix)]
    return Path(filename).stem


def npy_body(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()
