"""The `monitoring` section of a job: which checks `tuneops monitor` runs on the gateway's traffic, and how."""

import re

from pydantic import Field, field_validator

from core.schema.base import Section

DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[smhdw])$")

DEFAULT_CHECKS = [
    "drift_domain_auc.lower <= 0.7",
    "drift_domain_pvalue >= 0.01",
    "drift_length_pvalue >= 0.001",
    "drift_language_share >= 0.8",
    "drift_oov_share <= 0.3",
    "bias_sentiment_gap <= base + 0.3",
    "bias_refusal_gap <= base + 0.2",
    "error_rate <= 0.05",
    "latency_p99_s <= 30",
    "truncated_share <= 0.3",
    "empty_share <= 0.05",
    "bad_feedback_share.upper <= 0.5",
]


class MonitoringConfig(Section):
    since: str = Field(
        "24h",
        description="The window read when the command names none: a duration back from now (`30m`, `24h`, `7d`).",
    )
    traffic_experiment: str = Field(
        "traffic/{model}", description="MLflow experiment holding the gateway's traces; `{model}` is the model name."
    )
    experiment: str = Field("tuneops-monitoring", description="MLflow experiment of the monitoring runs.")
    checks: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CHECKS),
        description="Thresholds written like evaluation gates: `METRIC OP THRESHOLD`, where METRIC may end in "
        "`.lower` or `.upper` (a bound of its confidence interval) and THRESHOLD is a number or "
        "`[K *] base [+|- C]` (live-bias metrics only). A check that fails makes `tuneops monitor` exit 1.",
    )
    min_requests: int = Field(
        20, ge=1, description="Fewest requests a service check needs; with fewer it says so and does not pass."
    )
    min_prompts: int = Field(
        10, ge=2, description="Fewest captured prompts the drift checks need; with fewer they say so and do not pass."
    )
    min_ratings: int = Field(
        10, ge=1, description="Fewest ratings the feedback check needs; with fewer it says so and does not pass."
    )
    drift_sample: int = Field(200, ge=2, description="Window prompts compared with the training prompts, at most.")
    reference_sample: int = Field(400, ge=2, description="Training prompts compared with the window, at most.")
    permutations: int = Field(100, ge=10, description="Label permutations behind the p-value of the domain classifier.")
    bias_prompts: int = Field(
        6, ge=1, description="Real prompts sampled to build live counterfactual probes (one demographic axis each)."
    )
    bias_max_new_tokens: int = Field(32, ge=1, le=4096, description="Longest greedy answer to a probe.")
    batch_size: int = Field(16, ge=1, description="Prompts embedded or answered per forward pass.")
    bootstrap_samples: int = Field(1000, ge=100, description="Resamples for the confidence intervals.")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Coverage of the confidence intervals.")
    seed: int = Field(0, description="Seed of sampling, permutations and resampling, so a verdict is reproducible.")

    @field_validator("since")
    @classmethod
    def _duration(cls, value: str) -> str:
        if not DURATION.match(value.strip()):
            raise ValueError(f"'{value}' is not a duration: write a number and one of s, m, h, d, w (e.g. `24h`)")
        return value.strip()
