"""The `latentbank` command line. Verbs arrive with the parts they drive (see README)."""

from __future__ import annotations

from importlib.metadata import version

import typer

app = typer.Typer(help="latentbank: train VAEs, store latents, serve ONNX decoders.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def _root() -> None:
    """latentbank command line."""


@app.command("version")
def show_version() -> None:
    """Print the installed latentbank version."""
    typer.echo(version("latentbank"))


def main() -> None:
    app()
