"""Arguments and options that several commands share, so they read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JobArg = Annotated[Path, typer.Argument(help="Job file (YAML).", exists=False)]
Overrides = Annotated[list[str] | None, typer.Argument(help="Overrides such as training.learning_rate=1e-4.")]
TrackingOpt = Annotated[
    str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI).")
]
