"""The verdict of an evaluation, and how it is stored on (and read back from) the model version's tags.

Promotion trusts only these tags, so the registry alone says whether a version may go to production.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from evaluate.gates import GateResult

if TYPE_CHECKING:
    from mlflow import MlflowClient

VERDICT_TAG = "tuneops.verdict"
EVALUATION_RUN_TAG = "tuneops.evaluation_run"
GATES_FAILED_TAG = "tuneops.gates_failed"
GATES_TAG = "tuneops.gates"
EVALUATED_AT_TAG = "tuneops.evaluated_at"
TAG_LIMIT = 4900


@dataclass
class Verdict:
    """Whether a version passed every gate, with each gate's value, threshold, interval and outcome."""

    name: str
    version: str
    passed: bool
    gates: list[GateResult]
    evaluation_run: str
    metrics: dict[str, float] = field(default_factory=dict)
    model_card: str = ""

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def summary(self) -> str:
        outcome = "PASS" if self.passed else "FAIL"
        head = f"{self.name}/{self.version}: {outcome} (evaluation run {self.evaluation_run})"
        if not self.gates:
            return head + "\n  no gates configured"
        return "\n".join([head, *("  " + g.describe() for g in self.gates)])


def record(client: MlflowClient, verdict: Verdict) -> None:
    """Tag the model version with the verdict, so promotion can check it later."""
    tags = {
        VERDICT_TAG: "pass" if verdict.passed else "fail",
        EVALUATION_RUN_TAG: verdict.evaluation_run,
        GATES_FAILED_TAG: "; ".join(g.gate for g in verdict.failed)[:TAG_LIMIT],
        GATES_TAG: json.dumps([g.describe() for g in verdict.gates])[:TAG_LIMIT],
        EVALUATED_AT_TAG: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key, value in tags.items():
        client.set_model_version_tag(verdict.name, verdict.version, key, value)


@dataclass(frozen=True)
class StoredVerdict:
    """A verdict as read back from tags: None when the version was never evaluated."""

    verdict: str | None
    evaluation_run: str | None
    gates_failed: list[str]


def read(client: MlflowClient, name: str, version: str) -> StoredVerdict:
    tags = client.get_model_version(name, version).tags
    failed = [g for g in (tags.get(GATES_FAILED_TAG) or "").split("; ") if g]
    return StoredVerdict(tags.get(VERDICT_TAG), tags.get(EVALUATION_RUN_TAG), failed)
