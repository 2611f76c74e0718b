"""The optional LLM judge of the quality suite: an OpenAI-compatible endpoint grades each answer against its reference.

Overlap metrics (ROUGE-L, token F1) miss a correct answer in other words; a judge model does not. Grading goes
through MLflow's GenAI judges (`mlflow.genai.judges.make_judge`) with an `openai:/MODEL` URI whose `base_url` is
the endpoint's chat route, so any OpenAI-compatible server (a tuneops gateway, vLLM, a hosted API) can judge.

Each answer ends up `correct`, `incorrect` or `unparsed` (the judge answered, but not with a readable yes/no).
`judge_correct` is reported for a subject only when every one of its answers was graded: a judge that cannot keep
to the format then fails a gate on it as "not measured" instead of passing it on zeros (`0 >= base` when base is
zero too). An endpoint that cannot be reached, refuses the key or the request stops the evaluation with a JudgeError.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from core.errors import TuneopsError
from core.schema.evaluation import JudgeConfig
from evaluate.bootstrap import mean_metric
from evaluate.results import SuiteResult

if TYPE_CHECKING:
    from mlflow.genai.judges import Judge

CORRECT, INCORRECT, UNPARSED = "correct", "incorrect", "unparsed"
METRIC = "judge_correct"
NAME = "tuneops_correctness"
INSTRUCTIONS = (
    "Decide whether the answer in {{ outputs }} correctly answers the question in {{ inputs }}, using the reference "
    "answer in {{ expectations }} as the truth. Wording may differ; the answer is correct when it states what the "
    "reference states and contradicts none of it. Reply with result yes or no and a one-sentence rationale."
)
_YES = {"yes", "y", "true", "correct", "pass"}
_NO = {"no", "n", "false", "incorrect", "fail"}
_PARSE_FAILURE = "Failed to parse response from judge model"  # MLflow's message for a reply that is not JSON


class JudgeError(TuneopsError):
    """The judge endpoint cannot be used: unreachable, the key refused, the model not served, a request refused."""


@dataclass(frozen=True)
class Grade:
    """One answer's outcome (CORRECT, INCORRECT or UNPARSED) and the judge's rationale, or why it was unparsed."""

    outcome: str
    rationale: str


def parse_verdict(value: object) -> bool | None:
    """The judge's `result` as correct (True) or not (False); None when it is neither a yes nor a no."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    word = value.strip().strip("\"'`.!").strip().lower()
    return True if word in _YES else False if word in _NO else None


def chat_url(cfg: JudgeConfig) -> str:
    """Where the judge posts: MLflow's `base_url` is the full chat route, not the API root."""
    return f"{cfg.base_url}/chat/completions"


def _api_key(cfg: JudgeConfig) -> str | None:
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key:
        raise JudgeError(
            f"evaluation.judge.api_key_env names {cfg.api_key_env}, which is not set in the environment; "
            "export the endpoint's key there (or set api_key_env: null for an endpoint without keys)"
        )
    return key


def _headers(cfg: JudgeConfig) -> dict[str, str]:
    """Always our own authorization, so an OPENAI_API_KEY in the environment never goes to a third-party endpoint."""
    return {"authorization": f"Bearer {_api_key(cfg) or 'none'}"}


def check_endpoint(cfg: JudgeConfig) -> None:
    """Fail fast, before any model loads: the endpoint answers, takes the key and, when it lists models, serves ours.

    MLflow retries a request that cannot connect ten times with backoff (minutes), so an unreachable judge is
    caught here with one request to `BASE_URL/models` instead.
    """
    where = f"judge endpoint {cfg.base_url} (evaluation.judge.base_url)"
    request = urllib.request.Request(f"{cfg.base_url}/models", headers=_headers(cfg))
    try:
        with urllib.request.urlopen(request, timeout=min(cfg.timeout_s, 30)) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise JudgeError(
                f"{where} refused the API key (HTTP {exc.code}); check evaluation.judge.api_key_env"
            ) from None
        if exc.code in (404, 405):
            return  # no model list on this endpoint: the first judge request will tell
        raise JudgeError(f"{where} answered HTTP {exc.code} to GET /models") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise JudgeError(f"{where} cannot be reached: {reason}") from None
    try:
        served = {str(m["id"]) for m in json.loads(body)["data"]}
    except (ValueError, KeyError, TypeError):
        return  # not an OpenAI model list; the first judge request will tell
    if served and cfg.model not in served:
        raise JudgeError(
            f"{where} does not serve model '{cfg.model}' (evaluation.judge.model); "
            f"it serves: {', '.join(sorted(served))}"
        )


@contextmanager
def _environment(cfg: JudgeConfig) -> Iterator[None]:
    """Set for the grading only, restored after: MLflow's OpenAI provider insists on OPENAI_API_KEY (our header
    replaces it), reads its request timeout from MLFLOW_GATEWAY_ROUTE_TIMEOUT_SECONDS, and would fetch OpenAI's
    model catalog from github.com for context sizes and prices that mean nothing for a self-hosted judge (seconds of
    retries offline) unless MLFLOW_MODEL_CATALOG_URI is empty or set by the user."""
    wanted = {"MLFLOW_GATEWAY_ROUTE_TIMEOUT_SECONDS": str(cfg.timeout_s)}
    if "MLFLOW_MODEL_CATALOG_URI" not in os.environ:
        wanted["MLFLOW_MODEL_CATALOG_URI"] = ""
    if not os.environ.get("OPENAI_API_KEY"):
        wanted["OPENAI_API_KEY"] = "unused"  # never sent: _headers overrides the authorization
    before = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make(cfg: JudgeConfig) -> Judge:
    """The MLflow judge: yes/no correctness against the reference, greedy, on the configured endpoint."""
    from mlflow.genai.judges import make_judge

    return make_judge(
        name=NAME,
        instructions=INSTRUCTIONS,
        model=f"openai:/{cfg.model}",
        feedback_value_type=Literal["yes", "no"],
        inference_params={"temperature": 0, "max_tokens": cfg.max_tokens},
        base_url=chat_url(cfg),
        extra_headers=_headers(cfg),
    )


def grade_one(judge: Judge, cfg: JudgeConfig, prompt: str, reference: str, answer: str) -> Grade:
    """Ask the judge about one answer; a reply without a readable verdict is UNPARSED, a failed request raises."""
    from mlflow.entities import Feedback
    from mlflow.exceptions import MlflowException

    try:
        feedback = judge(inputs=prompt, outputs=answer, expectations={"expected_response": reference})
    except (KeyError, TypeError, ValueError) as exc:  # JSON without a `result`, or not an object
        return Grade(UNPARSED, f"judge reply without a result ({type(exc).__name__}: {exc})"[:500])
    except MlflowException as exc:
        if str(exc.message).startswith(_PARSE_FAILURE):
            reply = str(exc.message)[len(_PARSE_FAILURE) :].removeprefix(". Response: ")
            return Grade(UNPARSED, f"judge reply is not JSON: {reply}"[:500])
        raise JudgeError(f"judge '{cfg.model}' at {cfg.base_url} failed: {exc.message}") from None
    if not isinstance(feedback, Feedback):
        return Grade(UNPARSED, f"judge returned {type(feedback).__name__}, not one verdict"[:500])
    verdict = parse_verdict(feedback.value)
    rationale = str(feedback.rationale or "")
    if verdict is None:
        return Grade(UNPARSED, f"result {feedback.value!r} is neither yes nor no; rationale: {rationale}"[:500])
    return Grade(CORRECT if verdict else INCORRECT, rationale)


def grade(cfg: JudgeConfig, items: Sequence[tuple[str, str, str]]) -> list[Grade]:
    """Grade (prompt, reference, answer) triples, `cfg.concurrency` at a time; the first JudgeError stops it all."""
    judge = make(cfg)
    with _environment(cfg), ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="judge") as pool:
        futures = [pool.submit(grade_one, judge, cfg, *item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def add_judge(result: SuiteResult, cfg: JudgeConfig) -> None:
    """Grade every subject's answers in a quality result: row columns, `judge_correct` and the unparsed count.

    Rows get `judge_{label}` (correct, incorrect or unparsed) and `judge_rationale_{label}`; the metric is the share
    graded correct, with a bootstrap interval, and only when no answer of that subject was left unparsed.
    """
    labels = list(result.metrics)
    items = [
        (str(r["prompt"]), str(r["reference"]), str(r[f"answer_{label}"])) for label in labels for r in result.rows
    ]
    grades = grade(cfg, items)
    n = len(result.rows)
    for k, label in enumerate(labels):
        mine = grades[k * n : (k + 1) * n]
        for row, g in zip(result.rows, mine, strict=True):
            row[f"judge_{label}"] = g.outcome
            row[f"judge_rationale_{label}"] = g.rationale
        unparsed = sum(g.outcome == UNPARSED for g in mine)
        result.breakdown.setdefault(label, {})["judge_unparsed"] = float(unparsed)
        if n and not unparsed:
            result.metrics[label][METRIC] = mean_metric(np.array([g.outcome == CORRECT for g in mine], dtype=float))
    measured: dict[str, Any] = {label: m[METRIC].value for label, m in result.metrics.items() if METRIC in m}
    if measured:
        result.charts["Quality: answers the LLM judge graded correct"] = {METRIC: measured}
