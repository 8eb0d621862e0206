"""`latentbank aliases ...`: names for models and embedding sets (/v1/aliases)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import typer

from service.cli.output import JsonOpt, client, emit_json, fail, listing, out, table, verb

aliases_app = typer.Typer(help="Aliases (prod, staging, ...) for models and embedding sets; "
                               "use @name wherever an id goes.", no_args_is_help=True)
COLUMNS = ["alias", "kind", "target", "updated", "changes"]


def _rows(items: list[dict[str, Any]]) -> Iterator[list[Any]]:
    for a in items:
        yield [a["name"], a["kind"], a["target_id"], a["updated_at"], len(a["history"])]


@aliases_app.command("set")
@verb
def aliases_set(name: Annotated[str, typer.Argument(help="the alias, e.g. prod")],
                model: Annotated[int | None, typer.Option(help="a ready model's id")] = None,
                embedding: Annotated[int | None, typer.Option(
                    help="a ready embedding set's id")] = None,
                as_json: JsonOpt = False) -> None:
    """Create the alias or move it (atomically) to a model or an embedding set."""
    if (model is None) == (embedding is None):
        raise fail("give exactly one of --model ID and --embedding ID")
    with client() as c:
        alias = c.aliases.set(name, model=model, embedding_set=embedding)
    got = alias.raw
    if as_json:
        emit_json(got)
        return
    kind = got["kind"].replace("_", " ")
    verb_done = "created" if alias.created else "points at"
    out.print(f"alias {got['name']} {verb_done} {kind} {got['target_id']}")


@aliases_app.command("list")
@verb
def aliases_list(as_json: JsonOpt = False) -> None:
    """Every alias, its target and how often it changed."""
    with client() as c:
        items = c.aliases.list()
    listing(items, as_json, "aliases", COLUMNS, _rows)


@aliases_app.command("show")
@verb
def aliases_show(name: str, as_json: JsonOpt = False) -> None:
    """One alias with its whole history."""
    with client() as c:
        got = c.aliases.get(name).raw
    if as_json:
        emit_json(got)
        return
    table(f"alias {name}: {got['kind'].replace('_', ' ')} {got['target_id']}",
          ["at", "action", "to", "from", "key"],
          ([h["at"], h["action"], h["target_id"], h["previous_id"], h["key_id"]]
           for h in got["history"]))


@aliases_app.command("rm")
@verb
def aliases_rm(name: str, as_json: JsonOpt = False) -> None:
    """Delete the alias (its history stays)."""
    with client() as c:
        c.aliases.delete(name)
    emit_json({"deleted": name}) if as_json else out.print(f"deleted alias {name}")
