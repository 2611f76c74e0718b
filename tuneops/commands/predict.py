"""`tuneops predict`: answer a JSONL file of prompts or chats offline with one registered version."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneops.commands.options import TrackingOpt


def predict(
    model: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS, NAME/VERSION or a run id.")],
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="JSONL: one object per line with 'messages' or 'prompt'.")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="JSONL answers; rows already in it are kept (resume).")
    ],
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens generated per row.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 answers greedily (reproducible).")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling at temperature > 0.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows generated together.")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Answer INPUT through the gateway's batching engine (no HTTP), resumable, logged as an MLflow run."""
    from core.errors import ConfigError
    from tuneops.predict import PredictOptions
    from tuneops.predict import predict as run_predict

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError([f"--device: '{device}' is not one of auto, cpu, cuda"])
    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError([f"--dtype: '{dtype}' is not one of auto, bf16, fp16, fp32"])
    options = PredictOptions(max_tokens, temperature, top_p, seed, batch_size, device, dtype)
    report = run_predict(model, input_path, output, options, tracking_uri, progress=progress)
    typer.echo(
        f"{report.version}: {report.answered} answered, {report.skipped} already in {output}, "
        f"{report.failed} failed; {report.completion_tokens} tokens in {report.seconds:.1f}s "
        f"({report.tokens_per_s:.1f} tokens/s); run {report.run_id}"
    )
    for failure in report.failures[:10]:
        typer.echo(f"  failed {failure}", err=True)
