"""`tuneops serve | serve-key-hash`: the OpenAI-compatible gateway over registered models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_SETTINGS = Path("configs/serve.yaml")


def serve(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="MODEL",
            help="Registered model names to serve, replacing the settings' `models`.",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help=f"Settings YAML; default {DEFAULT_SETTINGS} when it exists, else the environment."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Override the settings' host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override the settings' port.")] = None,
) -> None:
    """Serve promoted versions through an OpenAI-compatible API (CUDA when present, else CPU).

    `tuneops serve faq-assistant` serves that model with every other setting from configs/serve.yaml.
    """
    from serve.server import serve as run_gateway
    from serve.settings import load_settings

    if config is None and DEFAULT_SETTINGS.is_file():
        config = DEFAULT_SETTINGS
    run_gateway(load_settings(config, host=host, port=port, models=models or None))


def serve_key_hash(
    key: Annotated[str, typer.Argument(help="An API key to accept; '-' reads it from stdin.")],
) -> None:
    """Print the sha256 digest to list under `api_keys` (the gateway never stores keys)."""
    import sys

    from serve.auth import hash_key

    typer.echo(hash_key(sys.stdin.readline().strip() if key == "-" else key))
