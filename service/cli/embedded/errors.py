"""Why an embedded server cannot start here, and loading the package that runs one (the
container images leave both out)."""

from __future__ import annotations

import importlib
from typing import Any


class EmbeddedError(RuntimeError):
    """An embedded part cannot start here; the message says why and what to do."""


class OldDataFolder(EmbeddedError):
    """The data folder was made by another PostgreSQL major version: left untouched."""


class EmbeddedNotInstalled(EmbeddedError):
    """The embedded server's package is absent (the container images leave both out)."""


def embedded_package(module: str, package: str, what: str, setting: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EmbeddedNotInstalled(
            f"the embedded {what} needs the {package} package, which is not installed here "
            f"(the container images leave it out): set {setting} to a server, or "
            f"`pip install {package}`") from None
