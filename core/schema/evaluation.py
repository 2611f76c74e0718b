from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from core.schema.base import Section

Suite = Literal["quality", "crows", "bbq", "counterfactual"]


class BiasSample(Section):
    """How much of each published bias suite the default evaluation reads; `full: true` reads all of it."""

    crows: int | None = Field(
        150,
        ge=1,
        description="CrowS-Pairs pairs scored, a sample stratified by bias type (null: all 1,508).",
    )
    bbq: int | None = Field(
        72,
        ge=1,
        description="BBQ items scored, a sample stratified by category, context condition and question polarity "
        "(null: all 11,956).",
    )
    seed: int = Field(0, description="Seed of the samples: the same seed scores the same items, run after run.")


class JudgeConfig(Section):
    """An OpenAI-compatible chat endpoint that grades each quality answer against its reference (optional)."""

    base_url: str = Field(
        description="The endpoint's OpenAI API root, up to and including `/v1` (e.g. `http://127.0.0.1:8000/v1`, "
        "a tuneops gateway); the judge posts to `BASE_URL/chat/completions`.",
    )
    model: str = Field(min_length=1, description="The model the endpoint serves as judge (its `model` field).")
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable that holds the endpoint's API key (never the key itself); "
        "null for an endpoint without keys.",
    )
    timeout_s: int = Field(
        60,
        ge=1,
        le=3600,
        description="Seconds one judge request may take (MLflow retries a request that times out, with backoff).",
    )
    max_tokens: int = Field(256, ge=16, le=4096, description="Longest judge answer (its verdict and rationale).")
    concurrency: int = Field(4, ge=1, le=64, description="Judge requests in flight at once.")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1, not '{value}'"
            )
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment: the judge appends /chat/completions to it")
        return value.strip().rstrip("/")


class EvaluationConfig(Section):
    suites: list[Suite] = Field(
        default_factory=lambda: list(get_args(Suite)),
        description="What to measure: held-out quality and the three bias suites.",
    )
    extra_files: list[Path] = Field(
        default_factory=list,
        description="More evaluation data files (JSONL, JSON, CSV, Parquet, a folder of them or a saved `datasets` "
        "folder, in any shape training reads: chat `messages`, ShareGPT `conversations`, instruction, "
        "prompt/completion; the job's `data.columns` applies), scored beside the held-out split.",
    )
    crows_path: Path | None = Field(
        None, description="CrowS-Pairs-format CSV; default the shipped published CrowS-Pairs (1,508 pairs)."
    )
    bbq_path: Path | None = Field(
        None,
        description="BBQ-format JSONL, a file or a folder of them (plain or .gz); default the shipped published BBQ "
        "(11,956 items, 6 categories).",
    )
    counterfactual_path: Path | None = Field(
        None, description="Counterfactual prompt templates (JSONL); default the shipped suite."
    )
    max_examples: int = Field(64, ge=1, description="Held-out items scored for quality, at most, per file.")
    sample: BiasSample = Field(
        default_factory=BiasSample,
        description="Stratified samples of the bias suites (sizes and seed), recorded in the evaluation run.",
    )
    full: bool = Field(
        False, description="Score every item of every bias suite, ignoring `sample` (`tuneops evaluate --full`)."
    )
    max_bias_items: int | None = Field(
        None,
        ge=1,
        description="Items scored from each bias suite, at most, even with `full` (a stratified sample when the "
        "suite is larger); default no limit.",
    )
    max_new_tokens: int = Field(96, ge=1, le=4096, description="Longest greedy answer when generating.")
    counterfactual_max_new_tokens: int = Field(
        32,
        ge=1,
        le=4096,
        description="Longest greedy answer to a counterfactual prompt (kept short for speed).",
    )
    exact_match_max_words: int = Field(
        8,
        ge=1,
        description="Exact match is scored only on items whose reference answer has at most this many words.",
    )
    batch_size: int = Field(16, ge=1, description="Items scored or generated per forward pass.")
    compare_base: bool = Field(True, description="Also measure the base model on the same items.")
    compare_production: bool = Field(True, description="Also measure the current production version.")
    bootstrap_samples: int = Field(1000, ge=100, description="Resamples for confidence intervals of gates.")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Coverage of the bootstrap confidence intervals.")
    gate_on_ci: bool = Field(
        False,
        description="When true a gate passes only if its whole confidence interval is on the passing side; "
        "otherwise the point estimate decides and the interval is reported.",
    )
    seed: int = Field(0, description="Seed of the bootstrap resampling, so a verdict is reproducible.")
    gates: list[str] = Field(
        default_factory=list,
        description="Thresholds such as `rougeL >= 0.2`, `perplexity <= 0.9 * base`, "
        "`crows_pct_stereotype <= base + 2`; all must pass for promotion.",
    )
    on_train: bool = Field(True, description="Run at the end of `tuneops train` when this section is present.")
    judge: JudgeConfig | None = Field(
        None,
        description="An LLM that grades each quality answer against the reference through MLflow's GenAI judges "
        "(`judge_correct`, gateable); null: no judge.",
    )
