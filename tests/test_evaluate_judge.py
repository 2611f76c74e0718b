"""The optional LLM judge of the quality suite, pointed at a real tuneops gateway on loopback (tiny model).

A tiny random model cannot answer in the judge's format, so against the gateway every answer must come back
explicitly `unparsed` (never counted as correct) after the requests really reached it; a stub endpoint that does
answer yes/no checks the graded path and the metric.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import mlflow
import pytest
from test_serve_support import Running, free_port, running_gateway

from core.config import load_config
from core.errors import ConfigError
from core.schema.evaluation import EvaluationConfig, JudgeConfig
from core.schema.job import JobConfig
from evaluate import judge
from evaluate.bootstrap import Metric
from evaluate.gates import parse_gates
from evaluate.job import run_evaluation
from evaluate.readers import SUITES_DIR
from evaluate.results import SuiteResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [
    {"id": "a", "source": "s", "prompt": "What are your opening hours?", "reference": "Monday to Friday, 8am to 5pm."},
    {"id": "b", "source": "s", "prompt": "Do you offer free quotes?", "reference": "Yes, quotes are free."},
    {"id": "c", "source": "s", "prompt": "How long does an extension take?", "reference": "10 to 14 weeks."},
]


@pytest.fixture(scope="module")
def gateway(store) -> Iterator[Running]:
    """tiny-model version 1 in production, served on loopback: the judge endpoint."""
    store.publish("tiny-model", seed=0, alias="production")
    with running_gateway(["tiny-model"]) as running:
        yield running


def _cfg(url: str, **kw: Any) -> JudgeConfig:
    return JudgeConfig(**{"base_url": url, "model": "tiny-model", "max_tokens": 24, **kw})


def _quality_result(labels: tuple[str, ...] = ("model", "base")) -> SuiteResult:
    """A quality result as run_quality leaves it: rows with each subject's answer, metrics per subject."""
    rows = [{**r, **{f"answer_{label}": f"{label} says {r['reference']}" for label in labels}} for r in ROWS]
    return SuiteResult("quality", metrics={label: {"rougeL": Metric(0.5)} for label in labels}, rows=rows)


def _served(gateway: Running) -> float:
    return gateway.metric("tuneops:request_success_total", model_name="tiny-model")


# -- the verdict and the config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "verdict"),
    [
        ("yes", True),
        (" Yes. ", True),
        ('"no"', False),
        ("INCORRECT", False),
        ("correct", True),
        (True, True),
        (False, False),
        ("maybe", None),
        ("yes, mostly", None),
        ("", None),
        (1, None),
        (None, None),
        ({"result": "yes"}, None),
    ],
)
def test_parse_verdict_reads_a_yes_or_a_no_and_nothing_else(value, verdict):
    assert judge.parse_verdict(value) is verdict


def _problems(tmp_path: Path, judge_yaml: str) -> list[str]:
    path = tmp_path / "job.yaml"
    path.write_text(f"evaluation:\n  judge:\n{judge_yaml}")
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path)
    return err.value.problems


def test_judge_config_defaults_and_a_trailing_slash(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("evaluation:\n  judge: {base_url: 'http://127.0.0.1:8000/v1/', model: tiny-model}\n")
    cfg = load_config(JobConfig, path).evaluation
    assert cfg is not None and cfg.judge is not None
    assert cfg.judge.base_url == "http://127.0.0.1:8000/v1" and cfg.judge.api_key_env is None
    assert judge.chat_url(cfg.judge) == "http://127.0.0.1:8000/v1/chat/completions"
    assert EvaluationConfig().judge is None


def test_judge_base_url_must_be_an_http_url(tmp_path):
    found = _problems(tmp_path, "    base_url: 127.0.0.1:8000\n    model: m\n")
    assert found[0].startswith("evaluation.judge.base_url (line 3)") and "http://" in found[0]


def test_judge_model_is_required(tmp_path):
    found = _problems(tmp_path, "    base_url: http://127.0.0.1:8000/v1\n")
    assert found[0].startswith("evaluation.judge.model") and "Field required" in found[0]
    assert _problems(tmp_path, "    base_url: http://h/v1\n    model: ''\n")[0].startswith("evaluation.judge.model")


def test_judge_api_key_env_is_a_variable_name_not_a_key(tmp_path):
    found = _problems(tmp_path, "    base_url: http://h/v1\n    model: m\n    api_key_env: sk-abc123\n")
    assert found[0].startswith("evaluation.judge.api_key_env (line 5)")


def test_a_judge_gate_needs_a_judge():
    with pytest.raises(ConfigError, match=r"gates\[0\] `judge_correct >= base`: needs a judge"):
        parse_gates(EvaluationConfig(suites=["quality"], gates=["judge_correct >= base"]))
    cfg = EvaluationConfig(suites=["quality"], gates=["judge_correct >= base"], judge=_cfg("http://h/v1"))
    assert parse_gates(cfg)[0].suite == "quality"


# -- the endpoint ----------------------------------------------------------------------------------------------


def test_an_unreachable_endpoint_is_a_clear_error_before_any_request():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(
        judge.JudgeError, match=rf"judge endpoint {url} \(evaluation.judge.base_url\) cannot be reached"
    ):
        judge.check_endpoint(_cfg(url))


def test_a_model_the_gateway_does_not_serve_is_named(gateway):
    with pytest.raises(judge.JudgeError, match=r"does not serve model 'nope'.*tiny-model/1"):
        judge.check_endpoint(_cfg(gateway.url + "/v1", model="nope"))
    judge.check_endpoint(_cfg(gateway.url + "/v1"))


def test_a_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("TUNEOPS_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(judge.JudgeError, match="api_key_env names TUNEOPS_TEST_JUDGE_KEY, which is not set"):
        judge.check_endpoint(_cfg("http://127.0.0.1:1/v1", api_key_env="TUNEOPS_TEST_JUDGE_KEY"))


def test_a_refused_judge_request_stops_grading_instead_of_counting_as_unparsed(gateway):
    result = _quality_result(("model",))
    with pytest.raises(judge.JudgeError, match=r"judge 'tiny-model' at .* failed: .*'max_tokens' may be at most 256"):
        judge.add_judge(result, _cfg(gateway.url + "/v1", max_tokens=1000))
    assert "judge_correct" not in result.metrics["model"]


# -- grading ---------------------------------------------------------------------------------------------------


def test_the_gateway_grades_every_answer_and_gibberish_is_unparsed_not_correct(gateway):
    result = _quality_result()
    before = _served(gateway)
    judge.add_judge(result, _cfg(gateway.url + "/v1", concurrency=3))

    assert _served(gateway) - before >= 6  # one answered request per answer, at least
    for row in result.rows:
        for label in ("model", "base"):
            assert row[f"judge_{label}"] in (judge.CORRECT, judge.INCORRECT, judge.UNPARSED)
            assert row[f"judge_rationale_{label}"]
    for label in ("model", "base"):
        unparsed = sum(r[f"judge_{label}"] == judge.UNPARSED for r in result.rows)
        assert result.breakdown[label]["judge_unparsed"] == unparsed
        assert ("judge_correct" in result.metrics[label]) == (unparsed == 0)
    # a random model does not write {"result": "yes", ...}
    assert result.rows[0]["judge_model"] == judge.UNPARSED


class _Stub(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint whose judge says yes exactly when the answer holds the word 'model'."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("authorization"), "body": body})
        said = "yes" if "model says" in body["messages"][-1]["content"] else "no"
        reply = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": json.dumps({"result": said, "rationale": "stub"})},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        out = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stub.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_graded_answers_give_the_share_correct_with_an_interval_and_send_the_named_key(stub, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-openai-key-that-must-stay-home")
    monkeypatch.setenv("TUNEOPS_TEST_JUDGE_KEY", "judge-key")
    result = _quality_result()
    judge.add_judge(result, _cfg(stub, model="judge-model", api_key_env="TUNEOPS_TEST_JUDGE_KEY"))

    assert [r["judge_model"] for r in result.rows] == [judge.CORRECT] * 3
    assert [r["judge_base"] for r in result.rows] == [judge.INCORRECT] * 3
    assert result.rows[0]["judge_rationale_model"] == "stub"
    model, base = result.metrics["model"]["judge_correct"], result.metrics["base"]["judge_correct"]
    assert (model.value, model.n, base.value, base.n) == (1.0, 3, 0.0, 3)
    assert result.breakdown["model"]["judge_unparsed"] == 0
    assert {s["path"] for s in _Stub.seen} == {"/v1/chat/completions"}
    assert {s["auth"] for s in _Stub.seen} == {"Bearer judge-key"}
    assert {s["body"]["model"] for s in _Stub.seen} == {"judge-model"}
    assert all(s["body"]["temperature"] == 0 and s["body"]["max_tokens"] == 24 for s in _Stub.seen)


# -- the evaluation ---------------------------------------------------------------------------------------------


def test_evaluation_logs_the_judge_per_row_and_its_gate_is_not_measured_on_unparsed_answers(gateway, store):
    cfg = EvaluationConfig(
        suites=["quality"],
        extra_files=[SUITES_DIR / "faq_sample.jsonl"],
        max_examples=3,
        max_new_tokens=8,
        batch_size=4,
        bootstrap_samples=100,
        compare_production=False,
        gates=["judge_correct >= base", "rougeL >= 0"],
        judge=_cfg(gateway.url + "/v1"),
    )
    before = _served(gateway)
    verdict = run_evaluation("tiny-model/1", cfg, tracking_uri=store.uri, dtype="fp32")

    assert _served(gateway) - before >= 6  # 3 answers of the version and 3 of the base model
    assert verdict.metrics["eval.judge_unparsed"] == 3 and verdict.metrics["eval.base.judge_unparsed"] == 3
    assert "eval.judge_correct" not in verdict.metrics
    judged, plain = verdict.gates
    assert not judged.passed and judged.note == "not measured" and plain.passed
    run = mlflow.get_run(verdict.evaluation_run)
    assert run.data.params["judge"] == f"tiny-model at {gateway.url}/v1"
    table = mlflow.load_table("tables/quality.json", run_ids=[verdict.evaluation_run])
    assert set(table["judge_model"]) == {judge.UNPARSED} and set(table["judge_base"]) == {judge.UNPARSED}
    assert table["judge_rationale_model"].str.len().min() > 0


def test_evaluation_with_an_unreachable_judge_fails_before_loading_a_model(gateway, store):
    url = f"http://127.0.0.1:{free_port()}/v1"
    cfg = EvaluationConfig(
        suites=["quality"], extra_files=[SUITES_DIR / "faq_sample.jsonl"], max_examples=2, judge=_cfg(url)
    )
    with pytest.raises(judge.JudgeError, match="cannot be reached"):
        run_evaluation("tiny-model/1", cfg, tracking_uri=store.uri, dtype="fp32")
