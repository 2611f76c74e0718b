"""Write an evaluation into MLflow: a child run of the version's training run holds every number.

A child run (tag `mlflow.parentRunId` = training run) rather than the training run itself: a version can be
evaluated many times (new suites, new production to compare with), each evaluation keeps its own metrics,
tables and card, and the training run's own metrics stay as training wrote them. The training run gets a
`tuneops.evaluation_run` tag pointing at the latest evaluation.
"""

from __future__ import annotations

import math
import re
import time
from typing import TYPE_CHECKING, Any

from core.registry import VersionRef, actor
from evaluate.charts import grouped_bars, slug
from evaluate.results import SuiteResult

if TYPE_CHECKING:
    from mlflow import MlflowClient

QUALITY_PREFIX, BIAS_PREFIX = "eval", "bias"
FALLBACK_EXPERIMENT = "tuneops-evaluation"
_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(suite: str, subject: str, name: str) -> str:
    """`eval.rougeL`, `eval.base.rougeL`, `bias.crows_pct_stereotype`, `bias.production.cf_rougeL`, ..."""
    prefix = QUALITY_PREFIX if suite == "quality" else BIAS_PREFIX
    middle = "" if subject == "model" else f"{subject}."
    return _BAD_KEY.sub("_", f"{prefix}.{middle}{name}")


def start_run(client: MlflowClient, ref: VersionRef) -> str:
    """Create the evaluation run beside (and under) the training run; returns its id."""
    from mlflow.exceptions import MlflowException

    tags = {
        "mlflow.runName": f"evaluate {ref.label}",
        "mlflow.user": actor(),
        "tuneops.kind": "evaluation",
        "tuneops.evaluated_version": ref.label,
    }
    experiment_id = None
    if ref.run_id:
        try:
            experiment_id = client.get_run(ref.run_id).info.experiment_id
            tags["mlflow.parentRunId"] = ref.run_id
        except MlflowException:
            experiment_id = None
    if experiment_id is None:
        found = client.get_experiment_by_name(FALLBACK_EXPERIMENT)
        experiment_id = found.experiment_id if found else client.create_experiment(FALLBACK_EXPERIMENT)
    return str(client.create_run(experiment_id, tags=tags).info.run_id)


def training_summary(client: MlflowClient, ref: VersionRef) -> dict[str, Any]:
    """Lineage and headline numbers of the training run, for the model card."""
    from mlflow.exceptions import MlflowException

    if not ref.run_id:
        return {}
    try:
        run = client.get_run(ref.run_id)
    except MlflowException:
        return {"run_id": ref.run_id}
    datasets = [
        {"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source_type}
        for d in (run.inputs.dataset_inputs if run.inputs else [])
    ]
    params = run.data.params
    wanted = [k for k in params if k.startswith(("training.", "lora.", "data.")) and len(params[k]) < 80]
    summary: dict[str, Any] = {k: params[k] for k in sorted(wanted)[:25]}
    summary.update({f"metric {k}": v for k, v in sorted(run.data.metrics.items())[:25]})
    return {"run_id": ref.run_id, "datasets": datasets, "summary": summary}


def log_results(
    client: MlflowClient, run_id: str, results: dict[str, SuiteResult]
) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Metrics (batched), row tables and charts; returns the flat metrics and each chart's (title, path)."""
    import pandas as pd
    from mlflow.entities import Metric as MlflowMetric

    flat: dict[str, float] = {}
    for suite, result in results.items():
        for subject, metrics in result.metrics.items():
            for name, metric in metrics.items():
                flat[metric_key(suite, subject, name)] = metric.value
        for subject, extra in result.breakdown.items():
            for name, value in extra.items():
                flat[metric_key(suite, subject, name)] = value
    now = int(time.time() * 1000)
    batch = [MlflowMetric(k, float(v), now, 0) for k, v in flat.items() if v is not None and math.isfinite(v)]
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start : start + 1000])
    charts = []
    for suite, result in results.items():
        if result.rows:
            client.log_table(run_id, data=pd.DataFrame(result.rows), artifact_file=f"tables/{suite}.json")
        for title, data in result.charts.items():
            if not data:
                continue
            path = f"charts/{slug(title)}.png"
            client.log_figure(run_id, grouped_bars(title, data), path)
            charts.append((title, path))
    return flat, charts
