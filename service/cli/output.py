"""What every client verb shares: output (rich tables, `--json`), errors and their exit codes,
and the client, imported only when a verb runs (docs/reference/commands.md)."""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from latentbank_client import Client

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


def failure(exc: BaseException) -> tuple[int, str] | None:
    """The exit status and one-line reason of a failed verb, or None when `exc` is not a
    failure a verb reports (a bug: it is raised)."""
    errors = sys.modules.get("latentbank_client.errors")  # loaded if the client raised it
    if errors is not None and isinstance(exc, errors.LatentbankError):
        if isinstance(exc, errors.ConnectionFailed):
            return 3, exc.message
        if exc.status is None:  # refused by the client before sending, or a job's end
            return (2 if isinstance(exc, errors.InvalidInput) else 1), exc.message
        phrase = exc.response.reason_phrase if exc.response is not None else ""
        return 1, f"{exc.status} {phrase}: {exc.message}"
    if isinstance(exc, OSError | ValueError):
        return 2, str(exc)
    return None


NEEDS_CLIENT = ("the client verbs need the latentbank-client package: pip install "
                "./clients/python")


def require_client() -> ModuleType:
    """The latentbank_client package, or exit 2 saying how to install it. Every client
    verb (by `verb`) and `demo` pass here before anything else, so none of them meets a
    ModuleNotFoundError later on."""
    try:
        import latentbank_client
    except ImportError:
        raise fail(NEEDS_CLIENT) from None
    return latentbank_client


def verb(fn: F | None = None, *, offline: str | None = None) -> Any:
    """A client verb: it needs the client (`require_client`, checked before the verb
    runs, unless its flag `offline` is given: `keys create --direct` writes to the
    database), and the client's errors and bad local input become one line on stderr
    and an exit status (see `failure`)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not (offline and kwargs.get(offline)):
                require_client()
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                reported = failure(exc)
                if reported is None:
                    raise
                raise fail(reported[1], reported[0]) from None

        return wrapper  # type: ignore[return-value]

    return decorate if fn is None else decorate(fn)


def client() -> Client:
    """The client the verbs call through (URL and key: latentbank_client.config)."""
    return require_client().Client()  # type: ignore[no-any-return]


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


def show(data: dict[str, Any], title: str, as_json: bool) -> None:
    """One resource (the API's JSON): as it is, or a field/value table."""
    if as_json:
        emit_json(data)
    else:
        fields(title, data)


def listing(items: list[Any], as_json: bool, title: str, columns: list[str],
            rows: Callable[[list[dict[str, Any]]], Iterable[Iterable[Any]]]) -> None:
    """A list of results: their JSON as the API answered it, or a table."""
    raw = [item.raw for item in items]
    if as_json:
        emit_json(raw)
    else:
        table(title, columns, rows(raw))


def fmt(value: Any, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(
        value)


_REF = re.compile(r"^([1-9][0-9]{0,18}|@[a-z][a-z0-9_.-]{0,62})$")


def check_ref(value: str | None) -> str | None:
    """An id, or @name for an alias (a typer callback: a bad one is a usage error)."""
    if value is not None and not _REF.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is neither an id nor an alias (@name)")
    return value


def RefArg(what: str) -> Any:
    return typer.Argument(help=f"{what} id, or @alias", callback=check_ref)
