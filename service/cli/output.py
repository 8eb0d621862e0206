"""What every client verb shares: output (rich tables, `--json`), errors and the client.

Each client verb of the `latentbank` command is a call to the HTTP API.

Human output is a rich table on stdout (progress on stderr); `--json` prints the API's
JSON instead, for scripts. A failure prints one line, `error: <reason>`, on stderr and
exits 1 (the API refused or the job failed), 2 (bad usage or input) or 3 (no API).
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Iterable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.cli.client import Client, ClientError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)
for _console in (out, err):
    if not _console.is_terminal:  # a pipe or a file: wide lines rather than wrapped cells
        _console.width = 200

JsonOpt = Annotated[bool, typer.Option("--json", help="print the API's JSON (for scripts)")]
WatchOpt = Annotated[bool, typer.Option("--watch", help="follow the job until it ends")]
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"error: {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def verb(fn: F) -> F:
    """Turn ClientError and bad local input into one line on stderr and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except (OSError, ValueError) as exc:
            raise fail(str(exc), 2) from None

    return wrapper  # type: ignore[return-value]


def client() -> Client:
    return Client()


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: list[str], rows: Iterable[Iterable[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*(escape("" if v is None else str(v)) for v in row))
    out.print(t)


def fields(title: str, data: dict[str, Any]) -> None:
    table(title, ["field", "value"], ((k, json.dumps(v) if isinstance(v, dict | list) else v)
                                      for k, v in data.items()))


def fetch(path: str, **params: Any) -> Any:
    """GET `path` with the query parameters that are set."""
    with client() as c:
        return c.get(path, params={k: v for k, v in params.items() if v is not None})


def show(path: str, title: str, as_json: bool) -> None:
    """One resource: its JSON, or a field/value table."""
    data = fetch(path)
    if as_json:
        emit_json(data)
    else:
        fields(title, data)


def fmt(value: Any, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(
        value)


_REF = re.compile(r"^([1-9][0-9]{0,18}|@[a-z][a-z0-9_.-]{0,62})$")


def check_ref(value: str | None) -> str | None:
    """An id, or @name for an alias (a typer callback: a bad one is a usage error)."""
    if value is not None and not _REF.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is neither an id nor an alias (@name)")
    return value


def ref_json(value: str) -> int | str:
    """The id as JSON wants it: a number, or the alias string."""
    return value if value.startswith("@") else int(value)


def RefArg(what: str) -> Any:
    return typer.Argument(help=f"{what} id, or @alias", callback=check_ref)
