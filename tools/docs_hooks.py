"""MkDocs hooks (mkdocs.yml `hooks:`): the reference pages that are generated from the code
at build time, so that nothing generated is committed and nothing can go stale.

- `reference/cli.md`: every `latentbank` command and sub-command, walked from the typer app;
- `reference/endpoints.md`: every HTTP route of the FastAPI app's OpenAPI document, by tag,
  and `reference/openapi.json`, the document itself;
- `reference/configuration.md`: every `LATENTBANK_*` setting of `store.settings.Settings`;
- `reference/models-config.md`: every field of `models.config.VAEConfig` and `TrainConfig`.

Each `render_*` function returns a page's Markdown; tests/docs/test_generated.py checks them
against the objects. Building the app connects to nothing: the database and the broker are
only named (as tests/client/test_drift.py builds it).
"""

from __future__ import annotations

import ast
import dataclasses
import html
import inspect
import itertools
import json
import re
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# this checkout's code, whichever checkout the virtualenv was installed from
for path in (ROOT / "clients" / "python" / "src", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

GENERATED_NOTE = ("<!-- generated at build time by tools/docs_hooks.py from the code; "
                  "edit the code, not this page -->\n")


def cell(text: Any) -> str:
    """Text for one Markdown table cell: one line, HTML escaped, pipes escaped."""
    text = " ".join(str(text).split())
    return html.escape(text, quote=False).replace("|", "\\|")


def code(value: Any) -> str:
    """A value as inline code inside a table cell (backticks inside are dropped)."""
    text = " ".join(str(value).split()).replace("`", "'")
    return f"`{text}`" if text else ""


# --- the command line ------------------------------------------------------------------


def cli_commands() -> list[tuple[str, Any, Any]]:
    """(command path, click command, click context) for the root and every command and
    sub-command of the `latentbank` typer app, depth first in the app's own order."""
    import typer

    from service.cli.main import app

    root = typer.main.get_command(app)
    # typer carries its own copy of click: its classes, not the click package's
    context = root.context_class
    found = []

    def walk(command: Any, ctx: Any) -> None:
        found.append((ctx.command_path, command, ctx))
        for name, sub in subcommands(command, ctx):
            walk(sub, context(sub, info_name=name, parent=ctx))

    walk(root, context(root, info_name="latentbank"))
    return found


def subcommands(command: Any, ctx: Any) -> list[tuple[str, Any]]:
    """A group's visible commands (name, command), in the app's order; none for a command."""
    if not hasattr(command, "list_commands"):
        return []
    subs = [(name, command.get_command(ctx, name)) for name in command.list_commands(ctx)]
    return [(n, c) for n, c in subs if c is not None and not getattr(c, "hidden", False)]


def _param_default(param: Any) -> str:
    if param.required:
        return "required"
    default = param.default
    if callable(default) or "UNSET" in repr(default):
        return ""
    if getattr(param, "is_flag", False):
        return code(bool(default))
    if default is None or default == [] or default == ():
        return ""
    if isinstance(default, list | tuple):
        default = ",".join(map(str, default))
    return code(default)


def _param_type(param: Any, ctx: Any) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    shown = param.display_type(ctx) if hasattr(param, "display_type") else param.type.name
    shown = str(shown).strip("<>")
    return cell(shown) + (" (repeatable)" if getattr(param, "multiple", False) else "")


def render_cli() -> str:
    lines = [GENERATED_NOTE, "# CLI reference", "",
             "Every command of the `latentbank` program, generated from its typer app "
             "(`service/cli/main.py`) at build time: the help, the usage line and every "
             "argument and option, as `latentbank COMMAND --help` prints them. What each "
             "command is for, with the local stack's behaviour in full, is on "
             "[the command line](commands.md).", ""]
    for path, command, ctx in cli_commands():
        depth = path.count(" ")
        if depth:
            lines += [f"{'#' * min(depth + 1, 4)} `{path}`", ""]
        text = inspect.cleandoc(command.help or "").strip()
        if text:
            lines += [text.replace("\b\n", ""), ""]
        usage = " ".join(command.collect_usage_pieces(ctx))
        lines += ["```text", f"{path} {usage}".rstrip(), "```", ""]
        subs = subcommands(command, ctx)
        if subs:
            lines += ["| command | what it does |", "| --- | --- |"]
            for name, sub in subs:
                lines.append(f"| `{path} {name}` | {cell(sub.get_short_help_str(limit=200))} |")
            lines.append("")
        params = [p for p in command.get_params(ctx)
                  if p.name != "help" and not getattr(p, "hidden", False)]
        if params:
            lines += ["| argument or option | type | default | meaning |",
                      "| --- | --- | --- | --- |"]
            for param in params:
                if param.param_type_name == "argument":
                    name = code(param.name.upper())
                else:
                    name = ", ".join(code(o) for o in [*param.opts, *param.secondary_opts])
                meaning = getattr(param, "help", None) or ""
                lines.append(f"| {name} | {_param_type(param, ctx)} | {_param_default(param)} "
                             f"| {cell(meaning)} |")
            lines.append("")
    return "\n".join(lines)


# --- the HTTP API ------------------------------------------------------------------------


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document from an app built with settings that only name a
    database and a broker (nothing is connected)."""
    from service.api.app import create_app
    from store.settings import Settings

    with tempfile.TemporaryDirectory(prefix="latentbank-docs-") as folder:
        settings = Settings(database_url="postgresql+psycopg://docs:docs@127.0.0.1:9/none",
                            redis_url="redis://127.0.0.1:9/0", data_dir=Path(folder) / "data",
                            artifacts=(Path(folder) / "artifacts").as_uri())
        return create_app(settings).openapi()


METHODS = ("get", "post", "put", "patch", "delete")


def endpoints(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (method, path) of the document, in its order."""
    found = []
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                op = item[method]
                found.append({"method": method.upper(), "path": path,
                              "tag": (op.get("tags") or ["other"])[0],
                              "summary": op.get("summary", ""),
                              "description": op.get("description", ""),
                              "responses": sorted(op.get("responses", {}))})
    return found


def render_endpoints(document: dict[str, Any]) -> str:
    info = document.get("info", {})
    lines = [GENERATED_NOTE, "# HTTP API endpoints", "",
             f"Every route of the latentbank API (version {info.get('version', '?')}), "
             "generated at build time from the OpenAPI document of the FastAPI app "
             "(`service/api/app.py`). A running API serves the same document at "
             "`/openapi.json` and browsable, with every request and answer schema, at "
             "**`/docs`** (a Swagger UI shipped with the package: nothing loads from another "
             "origin). The document is also here as [openapi.json](openapi.json). Scopes, "
             "errors, examples and the behaviour of each route: "
             "[the HTTP API](http-api.md).", ""]
    description = inspect.cleandoc(info.get("description", "")).strip()
    if description:
        lines += [description, ""]
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for entry in endpoints(document):
        by_tag.setdefault(entry["tag"], []).append(entry)
    for tag, entries in by_tag.items():
        lines += [f"## {tag}", "", "| method | path | summary | description | answers |",
                  "| --- | --- | --- | --- | --- |"]
        for e in entries:
            first = inspect.cleandoc(e["description"]).split("\n\n")[0]
            answers = ", ".join(e["responses"])
            lines.append(f"| {e['method']} | {code(e['path'])} | {cell(e['summary'])} "
                         f"| {cell(first)} | {cell(answers)} |")
        lines.append("")
    return "\n".join(lines)


# --- configuration ------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    return re.sub(r"\b(typing|pathlib|builtins)\.", "", text)


def _size(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 20:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
            if value % size == 0:
                return f"{code(value)} ({value // size} {unit})"
    return code(value)


def settings_rows() -> list[dict[str, str]]:
    """One row per `Settings` field: its environment variable, type, default and meaning."""
    from store.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        if default in (None, [], {}):
            default_text = "unset" if default is None else code(json.dumps(default))
        else:
            default_text = _size(default)
        rows.append({"env": f"{prefix}{name}".upper(), "field": name,
                     "type": _type_name(field.annotation), "default": default_text,
                     "meaning": field.description or ""})
    return rows


def render_configuration() -> str:
    import store.settings

    intro = inspect.cleandoc(store.settings.__doc__ or "")
    lines = [GENERATED_NOTE, "# Configuration", "",
             "Every `LATENTBANK_*` environment variable the API, the workers and the CLI read, "
             "generated at build time from the `Settings` class (`store/settings.py`: its "
             "fields, types, defaults and descriptions).", "", intro, "",
             "Lists are given colon-separated (`LATENTBANK_ALLOWED_ROOTS`) or comma-separated "
             "(`LATENTBANK_ALLOWED_URLS`), mappings as JSON. More on what some settings mean "
             "in [the data layer](../internals/data-layer.md#configuration), and the bounds "
             "one request may cost in [security](../operations/security.md).", "",
             "| variable | type | default | meaning |", "| --- | --- | --- | --- |"]
    for row in settings_rows():
        lines.append(f"| {code(row['env'])} | {code(row['type'])} | {row['default']} "
                     f"| {cell(row['meaning'])} |")
    lines.append("")
    return "\n".join(lines)


# --- the models' configuration ------------------------------------------------------------

# The meaning of each field, as the README's tables gave them (the dataclasses' docstrings,
# rendered above each table, explain them together); tests/docs/test_generated.py fails
# when a field has no entry here or an entry names no field.
def field_docstrings(cls: type) -> dict[str, str]:
    """Each dataclass field's attribute docstring (the string literal on the line after
    it, as mkdocstrings reads them), from the class's source: the meanings live beside
    the fields in models/config.py, not in a table here."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    found = {}
    for field, after in itertools.pairwise(body):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            found[field.target.id] = " ".join(after.value.value.split())
    return found


def model_config_rows(cls: type) -> list[dict[str, str]]:
    meanings = field_docstrings(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if default is dataclasses.MISSING:
            shown = "required"
        elif default is None:
            shown = "unset (`null`)"
        else:
            shown = code(json.dumps(list(default) if isinstance(default, tuple) else default))
        rows.append({"field": f.name, "type": str(f.type), "default": shown,
                     "meaning": meanings.get(f.name, "")})
    return rows


def render_models_config() -> str:
    from models.config import TrainConfig, VAEConfig

    lines = [GENERATED_NOTE, "# Models' configuration", "",
             "The `model` and `training` objects of a training job (`POST /v1/training-jobs`, "
             "`latentbank train --config FILE`, `--set section.field=V`, the client's "
             "`models.train(..., model={...}, training={...})`), generated at build time from "
             "the dataclasses of `models/config.py`: their fields, types and defaults, and "
             "their docstrings. Both validate themselves on construction and round-trip "
             "through JSON; unknown keys are an error.", ""]
    for cls, section in ((VAEConfig, "model"), (TrainConfig, "training")):
        lines += [f"## `{cls.__name__}` (`{section}`)", "",
                  inspect.cleandoc(cls.__doc__ or ""), "",
                  "| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        for row in model_config_rows(cls):
            lines.append(f"| {code(row['field'])} | {code(row['type'])} | {row['default']} "
                         f"| {row['meaning'].replace('|', chr(92) + '|')} |")
        lines.append("")
    return "\n".join(lines)


# --- the hook ---------------------------------------------------------------------------


def generated_pages() -> dict[str, str]:
    document = openapi_document()
    return {
        "reference/cli.md": render_cli(),
        "reference/endpoints.md": render_endpoints(document),
        "reference/openapi.json": json.dumps(document, indent=2, sort_keys=True) + "\n",
        "reference/configuration.md": render_configuration(),
        "reference/models-config.md": render_models_config(),
    }


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pages to the build (MkDocs 1.6: `File.generated`)."""
    from mkdocs.structure.files import File

    for uri, content in generated_pages().items():
        existing = files.get_file_from_path(uri)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, uri, content=content))
    return files
