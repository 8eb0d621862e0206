"""Aliases (names for models and sets) and API keys (admin scope)."""

from __future__ import annotations

from typing import Any

from latentbank_client._core import Call, Plan, ident
from latentbank_client._jobs import Resource
from latentbank_client.errors import InvalidInput
from latentbank_client.results import Alias, ApiKey, CreatedKey, build

SCOPES = ("read", "write", "admin")


def _name(name: str) -> str:
    name = name[1:] if isinstance(name, str) and name.startswith("@") else name
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"an alias is a non-empty name; got {name!r}")
    return name


class Aliases(Resource):
    """`client.aliases`: names ('prod') for models and embedding sets, used as '@prod'
    wherever an id goes (`client.models["@prod"]`)."""

    def set(self, name: str, *, model: Any = None, embedding_set: Any = None) -> Alias:
        """Create alias `name` or move it (atomically) to `model` or `embedding_set`;
        the answer's `created` tells which (True: this call made it)."""
        if (model is None) == (embedding_set is None):
            raise InvalidInput("give exactly one of model= and embedding_set=")
        body = ({"model_id": ident(model, "model")} if model is not None
                else {"embedding_set_id": ident(embedding_set, "embedding_set")})

        def plan() -> Plan:
            response = yield Call("PUT", f"/v1/aliases/{_name(name)}", json=body)
            alias = Alias.of(response.json())
            alias.created = response.status_code == 201
            return alias
        return self._run(plan())

    def get(self, name: str) -> Alias:
        """One alias with its history."""
        def plan() -> Plan:
            response = yield Call("GET", f"/v1/aliases/{_name(name)}")
            return Alias.of(response.json())
        return self._run(plan())

    def list(self, kind: str | None = None) -> list[Alias]:
        """Every alias (of `kind` model or embedding_set)."""
        def plan() -> Plan:
            response = yield Call("GET", "/v1/aliases", params={"kind": kind})
            return [Alias.of(a) for a in response.json()]
        return self._run(plan())

    def delete(self, name: str) -> None:
        """Remove alias `name` (its history stays)."""
        def plan() -> Plan:
            yield Call("DELETE", f"/v1/aliases/{_name(name)}")
        return self._run(plan())


class Keys(Resource):
    """`client.keys` (an admin key's): create, list and revoke API keys."""

    def create(self, name: str, scopes: list[str] | tuple[str, ...] = ("read",)) -> CreatedKey:
        """A new key with `scopes` (read, write, admin); its secret `.key` is shown only
        in this answer."""
        if isinstance(scopes, str):
            scopes = [scopes]
        bad = [s for s in scopes if s not in SCOPES]
        if bad or not scopes:
            raise InvalidInput(f"scopes must be some of {', '.join(SCOPES)}; got {list(scopes)}")

        def plan() -> Plan:
            # not retried on a broken connection: a second try could make a second key
            response = yield Call("POST", "/v1/keys", json={"name": name,
                                                             "scopes": list(scopes)},
                                  safe=False)
            return build(CreatedKey, response.json())
        return self._run(plan())

    def list(self) -> list[ApiKey]:
        """Every key (never their secrets)."""
        def plan() -> Plan:
            response = yield Call("GET", "/v1/keys")
            return [build(ApiKey, k) for k in response.json()]
        return self._run(plan())

    def revoke(self, key_id: int) -> ApiKey:
        """Revoke key `key_id` (not the one making the call)."""
        def plan() -> Plan:
            response = yield Call("DELETE", f"/v1/keys/{ident(key_id, 'key_id')}")
            return build(ApiKey, response.json())
        return self._run(plan())
