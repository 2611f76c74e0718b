"""`tuneops monitor`: checks parsed like gates, measured on traces read back from a real SQLite store, judged
per served version, logged as a monitoring run; what cannot be measured says why and passes nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from test_monitor_support import FAQ, send

from core.errors import ConfigError
from core.traffic import Feedback, TrafficRecord, log_feedback
from evaluate.monitoring import bias, service
from evaluate.monitoring.checks import FAIL, NO_DATA, PASS, Measure, judge, parse_checks
from evaluate.monitoring.job import window_start
from tuneops.cli import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def record(i: int = 0, **kw) -> TrafficRecord:
    fields = {
        "trace_id": f"tr-{i}",
        "request_id": f"chatcmpl-{i}",
        "model": "tiny",
        "version": "1",
        "alias": None,
        "endpoint": "chat",
        "api_key_label": None,
        "started_at": datetime.now(UTC),
        "status": "ok",
        "http_status": 200,
        "error": None,
        "finish_reasons": ("stop",),
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "ttft_s": 0.01,
        "latency_s": 0.1,
        "messages": [{"role": "user", "content": FAQ[i % len(FAQ)]}],
        "prompt": FAQ[i % len(FAQ)],
        "completion": "Yes.",
        "feedback": (),
    }
    fields.update(kw)
    return TrafficRecord(**fields)


def rating(value: str | int, correction: str | None = None) -> Feedback:
    from core.traffic import normalise_rating

    return Feedback(normalise_rating(value), value, None, correction, "tester")


def write_config(tmp_path: Path, uri: str, **monitoring) -> Path:
    section = {"bias_prompts": 2, "bias_max_new_tokens": 4, "permutations": 10, "bootstrap_samples": 100}
    section.update(monitoring)
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump({"tracking": {"tracking_uri": uri}, "monitoring": section}))
    return path


# --- checks ------------------------------------------------------------------------------------------------------


def test_checks_are_parsed_like_gates_and_bad_ones_are_named():
    checks = parse_checks(["bad_feedback_share.upper <= 0.5", "bias_sentiment_gap <= 1.5 * base + 0.1"])
    assert (checks[0].bound, checks[0].threshold(None)) == ("upper", 0.5)
    assert checks[1].threshold(0.2) == pytest.approx(0.4)
    with pytest.raises(ConfigError) as exc:
        parse_checks(["error_rate <= base", "drift_auc <= 0.7", "latency_p99_s.middle <= 3", "error_rate 0.1"])
    text = str(exc.value)
    assert "monitoring.checks[0]" in text and "only live-bias metrics compare with base" in text
    assert "unknown metric 'drift_auc'" in text and ".lower or .upper" in text and "monitoring.checks[3]" in text


def test_a_check_on_an_interval_bound_judges_the_bound_and_unmeasured_checks_are_no_data():
    checks = parse_checks(["bad_feedback_share.upper <= 0.5", "bad_feedback_share <= 0.5", "error_rate <= 0.1"])
    measures = {"bad_feedback_share": Measure(0.4, (0.2, 0.7), n=10)}
    results = judge(checks, measures, {"service": "too little traffic: 3 request(s)"})
    assert [r.verdict for r in results] == [FAIL, PASS, NO_DATA]
    assert results[0].value == 0.4 and "upper bound" in results[0].note
    assert "too little traffic" in results[2].describe()


def test_window_start_reads_durations_and_dates():
    now = datetime(2026, 1, 2, 12, tzinfo=UTC)
    assert window_start("90m", now) == datetime(2026, 1, 2, 10, 30, tzinfo=UTC)
    assert window_start("2026-01-01T08:00", now) == datetime(2026, 1, 1, 8, tzinfo=UTC)
    with pytest.raises(ConfigError, match="--since 'yesterday'"):
        window_start("yesterday", now)


# --- measures -----------------------------------------------------------------------------------------------------


def test_service_measures_count_errors_cut_and_empty_answers_with_intervals():
    records = [record(i) for i in range(16)]
    records += [record(16, status="error", http_status=500, finish_reasons=(), completion_tokens=0)]
    records += [record(17, finish_reasons=("length",)), record(18, completion="  ", latency_s=9.0)]
    records += [record(19, completion_tokens=0, completion="")]
    got, why = service.service_measures(records, min_requests=20, confidence=0.95)
    assert why is None
    assert got["error_rate"].value == pytest.approx(1 / 20)
    lo, hi = got["error_rate"].ci
    assert lo < 0.05 < hi and hi < 0.3
    assert got["truncated_share"].value == pytest.approx(1 / 19)
    assert got["empty_share"].value == pytest.approx(2 / 19)
    assert got["latency_p99_s"].value > 5  # the one slow request is the tail
    got, why = service.service_measures(records[:5], min_requests=20, confidence=0.95)
    assert got == {} and "too little traffic: 5 request(s)" in why


def test_feedback_share_has_an_interval_and_needs_enough_ratings():
    records = [record(i, feedback=(rating("bad" if i < 3 else 5),)) for i in range(12)]
    got, why = service.feedback_measures(records, min_ratings=10, confidence=0.95)
    assert why is None and got["bad_feedback_share"].value == pytest.approx(0.25)
    assert got["bad_feedback_share"].ci[0] < 0.25 < got["bad_feedback_share"].ci[1]
    got, why = service.feedback_measures(records[:4], min_ratings=10, confidence=0.95)
    assert got == {} and "4 rating(s)" in why


def test_probes_swap_a_named_group_or_state_one():
    axes = {"religion": ["Muslim", "Christian"], "age": ["25 years old", "78 years old"]}
    probes = bias.make_probes(["As a christian, can I book a visit on Sunday?", "How long does a roof take?"], axes)
    assert probes[0].prompts == {
        "Muslim": "As a Muslim, can I book a visit on Sunday?",
        "Christian": "As a Christian, can I book a visit on Sunday?",
    }
    assert (
        probes[1].axis == "age" and probes[1].prompts["78 years old"] == "I'm 78 years old. How long does a roof take?"
    )
    known = bias.axes()
    assert {"gender", "religion"} <= set(known) and all(len(g) >= 2 for g in known.values())


# --- the command on a real store ----------------------------------------------------------------------------------


def test_monitor_judges_traffic_logs_a_run_and_exits_1_on_a_failed_check(make_version, mlflow_store, tmp_path, capsys):
    from mlflow import MlflowClient

    from core.registry import connect

    make_version("tiny", seed=0)
    ids = send(mlflow_store, "tiny", "1", 24, error_every=8)
    client = connect(mlflow_store)
    for i, trace_id in enumerate(ids[:12]):
        log_feedback(client, trace_id, rating("bad" if i % 2 else "good"))
    config = write_config(
        tmp_path,
        mlflow_store,
        checks=[
            "error_rate <= 0.05",
            "latency_p99_s <= 10",
            "bad_feedback_share <= 0.6",
            "drift_oov_share <= 0.3",
            "bias_sentiment_gap <= base + 2",
        ],
    )
    assert run(["monitor", "tiny", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "tiny/1: 24 request(s)" in out
    assert "FAIL     error_rate <= 0.05: value 0.125" in out  # 3 of 24 failed
    assert "PASS     latency_p99_s <= 10" in out and "PASS     bad_feedback_share <= 0.6: value 0.5" in out
    # A registered version whose run logged no training data: drift says why; live bias still runs.
    assert "NO DATA  drift_oov_share <= 0.3: cannot run:" in out and "logged no training data" in out
    assert "PASS     bias_sentiment_gap <= base + 2" in out and "verdict: fail" in out
    runs = MlflowClient(mlflow_store).search_runs([client.get_experiment_by_name("tuneops-monitoring").experiment_id])
    (monitoring,) = runs
    assert monitoring.data.tags["tuneops.monitoring_verdict"] == "fail"
    assert monitoring.data.metrics["v1.error_rate"] == pytest.approx(0.125)
    assert "v1.bias_sentiment_gap.base" in monitoring.data.metrics
    artifacts = Path(monitoring.info.artifact_uri.removeprefix("file://"))
    assert set(json.loads((artifacts / "monitoring/traces.json").read_text())["trace_ids"]) == set(ids)
    traffic = client.get_experiment_by_name("traffic/tiny").experiment_id
    linked = client.search_traces(
        locations=[traffic, monitoring.info.experiment_id], run_id=monitoring.info.run_id, include_spans=False
    )
    assert {t.info.trace_id for t in linked} == set(ids)  # the run's page lists the traffic it judged
    report = (artifacts / "monitoring/report.html").read_text()
    assert "tiny: fail" in report and "error_rate &lt;= 0.05" in report and "data:image/png;base64" in report


def test_too_little_traffic_content_not_captured_and_other_models_say_so(make_version, mlflow_store, tmp_path, capsys):
    make_version("tiny", seed=0)
    config = write_config(tmp_path, mlflow_store, min_requests=5)
    assert run(["monitor", "tiny", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "no traffic to tiny since" in out and "verdict: incomplete" in out
    assert "PASS" not in out and "NO DATA  error_rate <= 0.05: no traffic in the window" in out

    send(mlflow_store, "tiny", "1", 6, content=False, cut_every=0)
    send(mlflow_store, "tiny", "1", 2, as_model="elsewhere")
    send(mlflow_store, "tiny", "7", 1)
    make_version("tiny", seed=1)
    send(mlflow_store, "tiny", "2", 2, error_every=1)  # every request failed
    assert run(["monitor", "tiny", "--config", str(config), "--since", "1h"]) == 0
    out = capsys.readouterr().out
    assert "2 trace(s) from another model (elsewhere)" in out
    assert "NO DATA  drift_domain_auc.lower <= 0.7: content not captured" in out
    assert "NO DATA  bias_refusal_gap <= base + 0.2: content not captured" in out
    assert "PASS     error_rate <= 0.05" in out  # service checks still run
    assert "tiny/7: 1 request(s)" in out and "cannot run: model 'tiny' has no version 7" in out
    assert "too little traffic: 1 request(s) in the window, the service checks need 5" in out
    assert "NO DATA  bad_feedback_share.upper <= 0.5: too little feedback: 0 rating(s)" in out
    assert "NO DATA  drift_oov_share <= 0.3: no request in the window was answered" in out


def test_monitor_and_retrain_fail_in_one_line_when_the_tracking_server_is_down(tmp_path, capsys):
    from test_serve_support import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    assert run(["monitor", "tiny", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: tracking server {uri} is unreachable") and "\n" not in err
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"tracking": {"tracking_uri": uri}, "registry": {"model_name": "tiny"}}))
    assert run(["retrain", str(job), "--from", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: tracking server {uri} is unreachable") and "\n" not in err


def test_bad_monitoring_section_fails_before_anything_runs(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"monitoring": {"since": "yesterday", "checks": ["nope <= 1"], "extra": 1}}))
    assert run(["monitor", "tiny", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "monitoring.since" in err and "not a duration" in err and "monitoring.extra" in err
