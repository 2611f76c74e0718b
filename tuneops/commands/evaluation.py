"""`tuneops evaluate`: the evaluation stage's command.

It exits 1 when the version fails a gate, so scripts can stop on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from core.errors import ConfigError
from tuneops.commands.options import TrackingOpt


def _config_from_job(path: Path) -> dict[str, Any]:
    from core.config import read_yaml

    data, _ = read_yaml(path)
    section = data.get("evaluation") or {}
    if not isinstance(section, dict):
        raise ConfigError(["evaluation: must be a mapping"], source=str(path))
    return section


def _config_from_run(client: Any, run_id: str) -> dict[str, Any]:
    """The `evaluation` section of the job config the version was trained with, if it logged one."""
    import tempfile

    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="config/resolved.yaml", dst_path=tmp
            )
        except (MlflowException, OSError):
            return {}
        data = yaml.safe_load(Path(local).read_text()) or {}
    section = data.get("evaluation") if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def evaluate(
    model: Annotated[str, typer.Argument(help="NAME (its production alias), NAME@ALIAS, NAME/VERSION or a run id.")],
    suite: Annotated[
        list[str] | None,
        typer.Option("--suite", "-s", help="quality, crows, bbq or counterfactual; repeat for several."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Job YAML whose `evaluation` section to use.")
    ] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option("--gate", "-g", help="A gate such as 'rougeL >= 0.2'; replaces the config's."),
    ] = None,
    data: Annotated[list[Path] | None, typer.Option("--data", help="Extra evaluation data file.")] = None,
    crows: Annotated[Path | None, typer.Option("--crows", help="CrowS-Pairs-format CSV.")] = None,
    bbq: Annotated[Path | None, typer.Option("--bbq", help="BBQ-format JSONL.")] = None,
    counterfactual: Annotated[
        Path | None, typer.Option("--counterfactual", help="Counterfactual templates JSONL.")
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Score every item of the bias suites instead of the configured sample.")
    ] = False,
    max_examples: Annotated[int | None, typer.Option(help="Held-out items per file, at most.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest greedy answer.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Items per forward pass.")] = None,
    base: Annotated[bool, typer.Option("--base/--no-base", help="Compare with the base model.")] = True,
    production: Annotated[
        bool, typer.Option("--production/--no-production", help="Compare with the production version.")
    ] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    tracking_uri: TrackingOpt = None,
) -> None:
    """Measure quality and bias of a version beside base and production, judge its gates, record the verdict.

    Without --config, the gates and suites come from the `evaluation` section of the job the version was
    trained with (when its run logged one); options override them. With --suite, the configured gates of other
    suites are skipped (and listed); the verdict is then "partial" unless a gate failed.
    """
    from pydantic import ValidationError

    from core.config import format_problems
    from core.registry import connect, resolve_version
    from core.schema.evaluation import EvaluationConfig
    from evaluate.gates import split_by_suite
    from evaluate.job import run_evaluation

    client = connect(tracking_uri)
    version = resolve_version(client, model)
    section = _config_from_job(config) if config else _config_from_run(client, version.run_id)
    overrides: dict[str, Any] = {
        "suites": suite,
        "gates": gate,
        "extra_files": data,
        "crows_path": crows,
        "bbq_path": bbq,
        "counterfactual_path": counterfactual,
        "max_examples": max_examples,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
    }
    skipped: list[str] = []
    if suite and not gate and isinstance(section.get("gates"), list):
        applying, skipped = split_by_suite([str(g) for g in section["gates"]], suite)
        section = {**section, "gates": applying}
    section = {**section, **{k: v for k, v in overrides.items() if v is not None}}
    if full:
        section["full"] = True
    if not base:
        section["compare_base"] = False
    if not production:
        section["compare_production"] = False
    try:
        cfg = EvaluationConfig.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(format_problems(exc, EvaluationConfig, {}, set()), source="evaluation") from None
    if device not in {"auto", "cpu", "cuda"} or dtype not in {"auto", "bf16", "fp16", "fp32"}:
        raise ConfigError([f"--device {device} / --dtype {dtype}: not a known device or dtype"])
    outcome = run_evaluation(
        version.label,
        cfg,
        tracking_uri=tracking_uri,
        device=device,  # type: ignore[arg-type]
        dtype=dtype,  # type: ignore[arg-type]
        skipped_gates=skipped,
    )
    typer.echo(outcome.summary())
    typer.echo(f"model card: runs:/{outcome.evaluation_run}/model_card.html")
    if not outcome.passed:
        raise typer.Exit(1)
