"""The verdict of an evaluation, and how it is stored on the model version's tags.

Promotion (core.aliases) trusts only these tags, so the registry alone says whether a version may go to
production. An evaluation with no gates checked nothing: it is stored as "no gates", never as a pass. One that
ran only some suites (`tuneops evaluate --suite crows`) judged only their gates: when every judged gate
passed it is stored as "partial", which promotion does not take for a pass either.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.aliases import (
    EVALUATED_AT_TAG,
    EVALUATION_RUN_TAG,
    FAIL,
    GATES_FAILED_TAG,
    GATES_TAG,
    NO_GATES,
    PASS,
    VERDICT_TAG,
)
from evaluate.gates import GateResult

if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG_LIMIT = 4900
PARTIAL = "partial"


@dataclass
class Verdict:
    """Whether a version failed no gate (`passed`), with each gate's value, threshold, interval and outcome."""

    name: str
    version: str
    passed: bool
    gates: list[GateResult]
    evaluation_run: str
    metrics: dict[str, float] = field(default_factory=dict)
    model_card: str = ""
    description: str = ""
    skipped: list[GateResult] = field(default_factory=list)

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    @property
    def outcome(self) -> str:
        """ "pass", "fail", "partial" or "no gates": only a pass may be promoted without --force."""
        if not self.gates and not self.skipped:
            return NO_GATES
        if not self.passed:
            return FAIL
        return PARTIAL if self.skipped else PASS

    def summary(self) -> str:
        head = f"{self.name}/{self.version}: {self.outcome.upper()} (evaluation run {self.evaluation_run})"
        if not self.gates and not self.skipped:
            return head + "\n  no gates configured: promotion needs --force --reason"
        lines = [head, *("  " + g.describe() for g in self.gates)]
        if self.skipped:
            lines.append(f"  skipped ({len(self.skipped)}, their suites did not run):")
            lines += ["  " + g.describe() for g in self.skipped]
        return "\n".join(lines)


def record(client: MlflowClient, verdict: Verdict) -> None:
    """Tag the model version with the verdict, so promotion can check it later."""
    tags = {
        VERDICT_TAG: verdict.outcome,
        EVALUATION_RUN_TAG: verdict.evaluation_run,
        GATES_FAILED_TAG: "; ".join([g.gate for g in verdict.failed] + [f"not run: {g.gate}" for g in verdict.skipped])[
            :TAG_LIMIT
        ],
        GATES_TAG: json.dumps([g.describe() for g in verdict.gates + verdict.skipped])[:TAG_LIMIT],
        EVALUATED_AT_TAG: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key, value in tags.items():
        client.set_model_version_tag(verdict.name, verdict.version, key, value)
