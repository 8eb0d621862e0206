"""`latentbank keys ...`: the /v1/keys resource (admin scope)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from service.cli.output import (
    JsonOpt,
    client,
    emit_json,
    err,
    fail,
    listing,
    verb,
)

keys_app = typer.Typer(help="API keys (admin scope).", no_args_is_help=True)


@keys_app.command("create")
@verb(offline="direct")
def keys_create(
    name: Annotated[str, typer.Option(help="who or what uses the key")],
    scope: Annotated[list[str] | None, typer.Option(
        help="read, write or admin (repeatable; default read)")] = None,
    direct: Annotated[bool, typer.Option(
        help="write to the database in LATENTBANK_DATABASE_URL instead of calling the API "
             "(to make a deployment's first admin key)")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print its secret once (the server stores only its hash)."""
    scopes = scope or ["read"]
    if direct:
        created = _create_key_direct(name, scopes)
    else:
        with client() as c:
            created = c.keys.create(name, scopes).raw
    if as_json:
        emit_json(created)
        return
    sys.stdout.write(created["key"] + "\n")
    err.print(f"key {created['id']} ({created['prefix']}..., scopes "
              f"{','.join(created['scopes'])}) created; the secret above is not shown again")


def _create_key_direct(name: str, scopes: list[str]) -> dict[str, Any]:
    from store.db import Database, database_url
    from store.errors import StoreError
    from store.keys import create_key
    from store.settings import get_settings

    try:
        db = Database(database_url(get_settings()))
        try:
            k = create_key(db, name, scopes)
        finally:
            db.dispose()
    except StoreError as exc:
        raise fail(str(exc)) from None
    return {"id": k.id, "name": k.name, "key": k.key, "prefix": k.prefix, "scopes": k.scopes}


@keys_app.command("list")
@verb
def keys_list(as_json: JsonOpt = False) -> None:
    """Every key (never the secrets)."""
    with client() as c:
        items = c.keys.list()
    listing(items, as_json, "API keys", ["id", "name", "prefix", "scopes", "last used",
                                         "revoked"],
            lambda raw: ([k["id"], k["name"], k["prefix"], ",".join(k["scopes"]),
                          str(k["last_used_at"] or "")[:19], str(k["revoked_at"] or "")[:19]]
                         for k in raw))


@keys_app.command("revoke")
@verb
def keys_revoke(key_id: int, as_json: JsonOpt = False) -> None:
    """Revoke a key (other API processes notice within 10 s)."""
    with client() as c:
        k = c.keys.revoke(key_id).raw
    emit_json(k) if as_json else err.print(f"key {key_id} revoked")
