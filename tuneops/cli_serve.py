"""`tuneops serve`: the OpenAI-compatible gateway over the models named in its settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_command(
        config: Annotated[
            Path | None, typer.Option("--config", "-c", help="Settings YAML (configs/serve.yaml).")
        ] = None,
        host: Annotated[str | None, typer.Option(help="Override the settings' host.")] = None,
        port: Annotated[int | None, typer.Option(help="Override the settings' port.")] = None,
    ) -> None:
        """Serve promoted versions through an OpenAI-compatible API (CUDA when present, else CPU)."""
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # effective only if torch is not loaded yet
        from core.errors import TuneopsError
        from serve.server import serve
        from serve.settings import load_settings

        try:
            settings = load_settings(config, host=host, port=port)
        except TuneopsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        serve(settings)

    @app.command("serve-key-hash")
    def key_hash(
        key: Annotated[str, typer.Argument(help="An API key to accept; '-' reads it from stdin.")],
    ) -> None:
        """Print the sha256 digest to list under `api_keys` (the gateway never stores keys)."""
        import sys

        from serve.auth import hash_key

        typer.echo(hash_key(sys.stdin.readline().strip() if key == "-" else key))
