"""The generated reference pages (tools/docs_hooks.py) hold what they must, checked against
the objects themselves: every CLI command, every HTTP route, every setting, every field of
the models' configuration."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "tools" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("docs_hooks", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pages(hooks):
    return hooks.generated_pages()


def command_paths():
    """Every command path of the typer app, walked with typer's own API (not the hook's)."""
    from service.cli.main import app

    found = []

    def walk(info, prefix):
        for command in info.registered_commands:
            if not command.hidden:
                found.append(f"{prefix} {command.name or command.callback.__name__}")
        for group in info.registered_groups:
            walk(group.typer_instance, f"{prefix} {group.name}")

    walk(app, "latentbank")
    return found


def test_every_cli_command_is_in_the_reference(pages):
    page = pages["reference/cli.md"]
    paths = command_paths()
    assert len(paths) > 30
    for path in paths:
        assert f"`{path}`" in page, path


def test_every_option_of_a_command_is_in_the_reference(pages):
    page = pages["reference/cli.md"]
    section = page[page.index("## `latentbank train`"):]
    section = section[:section.index("\n## ", 5)]
    for option in ("--dataset", "--latent-dim", "--likelihood", "--sweep", "--watch"):
        assert f"`{option}`" in section, option


def app_routes():
    """(method, path, in the schema) of every FastAPI route of the app, built as the hook
    builds it (settings that only name a database and a broker), read from `app.routes`
    (not from any OpenAPI document). Routers a newer FastAPI keeps whole in `app.routes`
    are walked into."""
    import tempfile

    from fastapi.routing import APIRoute

    from service.api.app import create_app
    from store.settings import Settings

    with tempfile.TemporaryDirectory(prefix="latentbank-docs-test-") as folder:
        settings = Settings(database_url="postgresql+psycopg://docs:docs@127.0.0.1:9/none",
                            redis_url="redis://127.0.0.1:9/0", data_dir=Path(folder) / "data",
                            artifacts=(Path(folder) / "artifacts").as_uri())
        app = create_app(settings)

    found = []

    def walk(routes, prefix, in_schema):
        for route in routes:
            if isinstance(route, APIRoute):
                shown = in_schema and route.include_in_schema
                # path_format: `{key:path}` written `{key}`, as OpenAPI paths write it
                found.extend((m, prefix + route.path_format, shown)
                             for m in sorted(route.methods))
            elif hasattr(route, "original_router"):   # an included router (FastAPI ≥ 0.16x)
                context = route.include_context
                walk(route.original_router.routes, prefix + context.prefix,
                     in_schema and context.include_in_schema)

    walk(app.routes, "", True)
    return found


def test_every_route_of_the_app_is_in_the_endpoint_table(pages):
    page = pages["reference/endpoints.md"]
    routes = app_routes()
    assert len([r for r in routes if r[2]]) > 40
    for method, path, in_schema in routes:
        if in_schema:
            assert f"| {method} | `{path}` |" in page, (method, path)
    # the routes left out of the schema are the web UI and the Swagger UI, nothing else
    assert {(m, p) for m, p, shown in routes if not shown} == {
        ("GET", "/"), ("GET", "/ui"), ("GET", "/docs")}
    assert "`/docs`" in page


def test_the_openapi_document_has_every_route(pages):
    document = json.loads(pages["reference/openapi.json"])
    documented = {(m.upper(), p) for p, item in document["paths"].items() for m in item}
    assert {(m, p) for m, p, shown in app_routes() if shown} <= documented


def test_every_setting_is_in_the_configuration_page(pages):
    from store.settings import Settings

    page = pages["reference/configuration.md"]
    for name, field in Settings.model_fields.items():
        row = next((line for line in page.splitlines()
                    if line.startswith(f"| `LATENTBANK_{name.upper()}` |")), None)
        assert row is not None, name
        assert " ".join(field.description.split())[:40].replace("<", "&lt;").replace(
            ">", "&gt;") in row, name


def test_every_model_field_is_in_the_models_page_with_a_meaning(hooks, pages):
    from models.config import TrainConfig, VAEConfig

    page = pages["reference/models-config.md"]
    for cls in (VAEConfig, TrainConfig):
        # each field's meaning is the string on the line after it in models/config.py,
        # read here from the file's lines (not through the hook's parser)
        source = (ROOT / "models" / "config.py").read_text().splitlines()
        start = next(i for i, line in enumerate(source) if line.startswith(
            f"class {cls.__name__}"))
        for f in dataclasses.fields(cls):
            at = next(i for i in range(start, len(source))
                      if source[i].startswith(f"    {f.name}: "))
            assert source[at + 1].startswith('    """'), f"{f.name} has no docstring"
            first_words = " ".join(source[at + 1].strip().strip('"').split()[:4])
            row = next(line for line in page.splitlines() if line.startswith(f"| `{f.name}` |"))
            assert first_words in row, (f.name, first_words)
    assert "| `latent_dim` | `int` | `16` |" in page
    assert "| `epochs` | `int` | `20` |" in page
