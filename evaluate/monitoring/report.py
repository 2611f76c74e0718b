"""The monitoring run in MLflow: metrics per version, charts, a short self-contained HTML report, the checks as a
table and the ids of the traces it read, so a retrain it triggers can name the traffic behind it."""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from core.registry import actor
from core.traffic import experiment_id
from evaluate.monitoring.checks import FAIL, PASS

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

    from core.schema.monitoring import MonitoringConfig
    from evaluate.monitoring.job import MonitoringResult, VersionReport

REPORT_ARTIFACT = "monitoring/report.html"
TRACES_ARTIFACT = "monitoring/traces.json"
CHECKS_ARTIFACT = "monitoring/checks.json"
_COLOURS = {PASS: "#2e7d32", FAIL: "#c62828"}
log = logging.getLogger(__name__)


def _histograms(title: str, series: dict[str, list[float]], xlabel: str) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.2), dpi=100)
    ax = fig.add_subplot()
    values = [v for s in series.values() for v in s]
    bins = list(np.histogram_bin_edges(values, bins=min(30, max(5, len(set(values)))))) if values else 10
    for label, data in series.items():
        if data:
            ax.hist(data, bins=bins, alpha=0.55, density=True, label=f"{label} (n={len(data)})")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _scatter(title: str, reference: np.ndarray, window: np.ndarray) -> Figure:
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    points = PCA(n_components=2, random_state=0).fit_transform(np.vstack([reference, window]))
    fig = Figure(figsize=(5.0, 4.0), dpi=100)
    ax = fig.add_subplot()
    ax.scatter(
        points[: len(reference), 0],
        points[: len(reference), 1],
        s=10,
        alpha=0.5,
        label=f"training prompts (n={len(reference)})",
    )
    ax.scatter(
        points[len(reference) :, 0],
        points[len(reference) :, 1],
        s=14,
        alpha=0.8,
        label=f"window prompts (n={len(window)})",
    )
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _charts(v: VersionReport) -> dict[str, Figure]:
    charts: dict[str, Figure] = {}
    if v.lengths is not None:
        charts["prompt_length"] = _histograms(
            "Prompt length", {"training": list(v.lengths[0]), "window": list(v.lengths[1])}, "words"
        )
    if v.embeddings is not None and len(v.embeddings[0]) + len(v.embeddings[1]) > 2:
        charts["embeddings"] = _scatter("Prompt embeddings (base model, PCA)", *v.embeddings)
    if v.latencies:
        charts["latency"] = _histograms("Request latency", {"requests": v.latencies}, "seconds")
    bias = {k: m for k, m in v.measures.items() if k.startswith("bias_")}
    if bias:
        from evaluate.charts import grouped_bars

        data = {k: {"model": m.value, **({"base": m.base} if m.base is not None else {})} for k, m in bias.items()}
        charts["live_bias"] = grouped_bars("Live counterfactual probes: mean gap across groups", data)
    return charts


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def render_html(result: MonitoringResult, charts: dict[str, dict[str, Figure]]) -> str:
    """A short report: the verdict, the checks per version with their values, and the charts inline."""
    e = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'><title>monitoring</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}td,th{padding:2px 8px;text-align:left}"
        "table{border-collapse:collapse}tr:nth-child(even){background:#f4f4f4}</style>",
        f"<h1>{e(result.model)}: {e(result.outcome)}</h1>",
        f"<p>Traffic from {result.since:%Y-%m-%d %H:%M} to {result.until:%Y-%m-%d %H:%M} UTC; "
        f"{len(result.trace_ids)} trace(s) read.</p>",
    ]
    parts += [f"<p><i>{e(n)}</i></p>" for n in result.notes]
    for v in result.versions:
        parts.append(f"<h2>{e(result.model)}/{e(v.version)}: {v.requests} request(s)</h2>")
        if v.reference:
            parts.append(f"<p>Drift reference: {e(v.reference)}</p>")
        parts.append(
            "<table><tr><th>verdict</th><th>check</th><th>value</th><th>interval</th><th>threshold</th>"
            "<th>note</th></tr>"
        )
        for r in v.results:
            colour = _COLOURS.get(r.verdict, "#777")
            value = "" if r.value is None else f"{r.value:.4g}"
            ci = "" if r.ci is None else f"[{r.ci[0]:.4g}, {r.ci[1]:.4g}]"
            thr = "" if r.threshold is None else f"{r.threshold:.4g}"
            parts.append(
                f"<tr><td style='color:{colour}'><b>{e(r.verdict)}</b></td><td><code>{e(r.check)}</code></td>"
                f"<td>{value}</td><td>{ci}</td><td>{thr}</td><td>{e(r.note)}</td></tr>"
            )
        parts.append("</table>")
        for title, fig in charts.get(v.version, {}).items():
            parts.append(f"<h3>{e(title.replace('_', ' '))}</h3><img src='data:image/png;base64,{_png(fig)}'>")
    return "\n".join(parts)


def _metric_batch(result: MonitoringResult) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = [Metric("requests", float(len(result.trace_ids)), now, 0)]
    for v in result.versions:
        prefix = f"v{v.version}." if v.version != "-" else ""
        values = {"requests": float(v.requests)}
        for name, m in v.measures.items():
            values[name] = m.value
            if m.ci is not None:
                values[f"{name}.lower"], values[f"{name}.upper"] = m.ci
            if m.base is not None:
                values[f"{name}.base"] = m.base
        out += [Metric(prefix + k, float(x), now, 0) for k, x in values.items() if math.isfinite(x)]
    return out


def link_traces(client: MlflowClient, trace_ids: list[str], run_id: str) -> None:
    """Link the traces to the run, so the run's page in the MLflow UI lists the traffic it judged."""
    from mlflow.exceptions import MlflowException

    try:
        for start in range(0, len(trace_ids), 100):  # MLflow links at most 100 per call
            client.link_traces_to_run(trace_ids[start : start + 100], run_id)
    except (MlflowException, NotImplementedError) as exc:  # a store without links: traces.json still names them
        log.warning("could not link the traces to run %s: %s", run_id, exc)


def log_monitoring_run(client: MlflowClient, result: MonitoringResult, cfg: MonitoringConfig) -> tuple[str, str]:
    """Create and finish the monitoring run; returns (run id, experiment id)."""
    import pandas as pd

    from evaluate.monitoring.job import KIND_TAG, MODEL_TAG, VERDICT_TAG

    exp = experiment_id(client, cfg.experiment)
    tags = {
        "mlflow.runName": f"monitor {result.model}",
        "mlflow.user": actor(),
        KIND_TAG: "monitoring",
        MODEL_TAG: result.model,
        VERDICT_TAG: result.outcome,
        "tuneops.window_start": result.since.isoformat(),
        "tuneops.window_end": result.until.isoformat(),
        "tuneops.monitored_versions": ",".join(v.version for v in result.versions if v.version != "-"),
        "tuneops.traffic_experiment": cfg.traffic_experiment.format(model=result.model),
    }
    run = client.create_run(exp, tags=tags)
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, metrics=_metric_batch(result))
        charts = {v.version: _charts(v) for v in result.versions}
        for version, figs in charts.items():
            for title, fig in figs.items():
                client.log_figure(run_id, fig, f"charts/v{version}_{title}.png")
        rows = [
            {
                "version": v.version,
                "verdict": r.verdict,
                "check": r.check,
                "value": r.value,
                "lower": r.ci[0] if r.ci else None,
                "upper": r.ci[1] if r.ci else None,
                "threshold": r.threshold,
                "note": r.note,
            }
            for v in result.versions
            for r in v.results
        ]
        client.log_dict(run_id, {"checks": rows}, CHECKS_ARTIFACT)
        client.log_dict(run_id, {"model": result.model, "trace_ids": result.trace_ids}, TRACES_ARTIFACT)
        probes = [{"version": v.version, **p} for v in result.versions for p in v.probes]
        if probes:
            client.log_table(run_id, data=pd.DataFrame(probes), artifact_file="tables/live_bias_probes.json")
        client.log_text(run_id, render_html(result, charts), REPORT_ARTIFACT)
        link_traces(client, result.trace_ids, run_id)
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id, exp
