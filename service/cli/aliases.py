"""`latentbank aliases ...`: names for models and embedding sets (/v1/aliases)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import typer

from service.cli.output import JsonOpt, client, emit_json, fail, fetch, out, table, verb

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
    body = {"model_id": model} if model is not None else {"embedding_set_id": embedding}
    with client() as c:
        answer = c.request("PUT", f"/v1/aliases/{name}", json=body)
    got = answer.json()
    if as_json:
        emit_json(got)
        return
    kind = got["kind"].replace("_", " ")
    verb_done = "created" if answer.status_code == 201 else "points at"
    out.print(f"alias {got['name']} {verb_done} {kind} {got['target_id']}")


@aliases_app.command("list")
@verb
def aliases_list(as_json: JsonOpt = False) -> None:
    """Every alias, its target and how often it changed."""
    items = fetch("/v1/aliases")
    emit_json(items) if as_json else table("aliases", COLUMNS, _rows(items))


@aliases_app.command("show")
@verb
def aliases_show(name: str, as_json: JsonOpt = False) -> None:
    """One alias with its whole history."""
    with client() as c:
        got = c.get(f"/v1/aliases/{name}")
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
        c.request("DELETE", f"/v1/aliases/{name}")
    emit_json({"deleted": name}) if as_json else out.print(f"deleted alias {name}")
