"""What a suite hands back: gateable metrics per subject, row-level records, and per-group breakdowns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evaluate.bootstrap import Metric


@dataclass
class SuiteResult:
    """One suite's results.

    metrics: subject -> gateable metric name -> Metric (same items for every subject, so paired).
    breakdown: subject -> extra metric name -> value (per group or source; logged, not gated).
    charts: chart title -> group -> subject -> value (one grouped bar chart each).
    rows: every item with its answers and scores, for `mlflow.log_table`.
    """

    suite: str
    metrics: dict[str, dict[str, Metric]] = field(default_factory=dict)
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    charts: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
