"""Where a user's source may be: a path under the configured roots, or a URL under the
configured prefixes. Nothing else is opened: `resolve_location` is the only way a user's name
for a source becomes a `Location` (docs/internals/ingest.md)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from ingest.plan import Location
from store.errors import NotFound, PathNotAllowed, UnsupportedFormat

MAX_BRACE_NAMES = 100_000
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def has_brace(path: str) -> bool:
    return bool(_BRACE.search(path.rsplit("/", 1)[-1]))


def _alternatives(body: str) -> tuple[int, Any]:
    """A brace's count and how to list it: `a..b` (numbers, zero-padded as written) or
    `x,y,z`."""
    match = _RANGE.match(body)
    if match:
        lo, hi = int(match.group(1)), int(match.group(2))
        if hi < lo:
            raise PathNotAllowed(f"brace range {{{body}}} runs backwards")
        width = len(match.group(1)) if match.group(1).startswith("0") else 0
        return hi - lo + 1, lambda: (str(i).zfill(width) for i in range(lo, hi + 1))
    parts = body.split(",")
    if len(parts) < 2:
        raise PathNotAllowed(f"brace {{{body}}} must be a range a..b or a list x,y")
    return len(parts), lambda: iter(parts)


def brace_count(name: str) -> int:
    """How many names `name`'s braces expand to, without expanding them."""
    return math.prod(_alternatives(m.group(1))[0] for m in _BRACE.finditer(name))


def expand_braces(name: str, limit: int = MAX_BRACE_NAMES) -> list[str]:
    """`shard-{000..002}.tar` -> the three names; refused (403) past `limit` names, counted
    before any is made."""
    count = brace_count(name)
    if count > limit:
        raise PathNotAllowed(f"the brace pattern names {count} files; the limit is {limit}")
    names = [""]
    pos = 0
    for match in _BRACE.finditer(name):
        literal = name[pos:match.start()]
        _, listing = _alternatives(match.group(1))
        names = [n + literal + alt for n in names for alt in listing()]
        pos = match.end()
    return [n + name[pos:] for n in names]


def _check_text(uri: str) -> None:
    if "\x00" in uri:
        raise PathNotAllowed("a path cannot contain NUL characters")
    if "{" in uri.rsplit("/", 1)[0]:
        raise PathNotAllowed("a brace pattern is allowed in the last segment only")


def inside_roots(real: str, roots: tuple[str, ...]) -> bool:
    return any(os.path.commonpath([real, root]) == root for root in roots)


def resolve_allowed_path(uri: str, roots: list[Path]) -> str:
    """A server-side file named by a user: it must resolve (symlinks too) inside a root."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    real = _resolve_local(uri, path, roots)
    if not os.path.isfile(real):
        raise NotFound(f"{uri!r} is not a file")
    return real


def _resolve_local(uri: str, path: str, roots: list[Path]) -> str:
    _check_text(uri)
    if not roots:
        raise PathNotAllowed("registering server-side files is disabled (no allowed roots "
                             "configured: LATENTBANK_ALLOWED_ROOTS)")
    if not os.path.isabs(path):
        raise PathNotAllowed(f"{uri!r} is not an absolute path")
    real = os.path.realpath(path)
    if not inside_roots(real, _real_roots(roots)):
        raise PathNotAllowed(f"{uri!r} is outside the allowed roots")
    return real


def _real_roots(roots: list[Path]) -> tuple[str, ...]:
    return tuple(os.path.realpath(r) for r in roots)


def _normal_url(uri: str) -> str:
    scheme, rest = uri.split("://", 1)
    segments = rest.split("/")
    if any(s in ("..", ".") for s in segments) or "" in segments[:-1]:
        raise PathNotAllowed(f"{uri!r} must not contain '..', '.' or empty segments")
    return f"{scheme.lower()}://{rest}"


def resolve_location(uri: str, settings: Any) -> Location:
    """The source `uri` names, if it is allowed: an absolute local path (file or folder,
    `file://` accepted) inside `settings.allowed_roots`, or a URL under
    `settings.allowed_urls`. PathNotAllowed (403) says why not; NotFound (404) when it is
    allowed but absent. A brace pattern's files are checked by the WebDataset reader."""
    if not isinstance(uri, str) or not uri:
        raise PathNotAllowed("give a path or a URL")
    if uri.startswith("file://") or "://" not in uri:
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if has_brace(path):
            folder, name = os.path.split(path)
            expand_braces(name)  # refused early when too many
            real = os.path.join(_resolve_local(uri, folder, settings.allowed_roots), name)
        else:
            real = _resolve_local(uri, path, settings.allowed_roots)
            if not os.path.exists(real):
                raise NotFound(f"{uri!r} does not exist")
        import fsspec

        return Location(fsspec.filesystem("file"), real, os.path.basename(real.rstrip("/"))
                        or uri, roots=_real_roots(settings.allowed_roots))
    _check_text(uri)
    url = _normal_url(uri)
    prefixes = [_normal_url(p) for p in settings.allowed_urls]
    if not any(url == p.rstrip("/") or url.startswith(p if p.endswith("/") else p + "/")
               for p in prefixes):
        raise PathNotAllowed(f"{uri!r} is not under an allowed URL prefix "
                             "(LATENTBANK_ALLOWED_URLS)")
    if has_brace(url):
        expand_braces(url.rsplit("/", 1)[1])
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(url, **dict(settings.source_options or {}))
    except (ImportError, ValueError, TypeError) as exc:  # no such protocol, bad options
        raise UnsupportedFormat(f"{uri!r} cannot be opened here ({type(exc).__name__}: "
                                f"{str(exc)[:120]})") from None
    try:
        exists = has_brace(url) or fs.exists(path)
    except Exception as exc:  # credentials, permissions, an unreachable store
        raise PathNotAllowed(f"{uri!r} cannot be read with the configured source_options "
                             f"({type(exc).__name__})") from None
    if not exists:
        raise NotFound(f"{uri!r} does not exist")
    return Location(fs, path, uri)
