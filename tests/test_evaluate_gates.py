"""Gate parsing (one test per rule), judging against base/production, and bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ConfigError
from core.schema.evaluation import EvaluationConfig
from evaluate.bootstrap import draws, interval, mean_metric, ratio_metric
from evaluate.gates import judge, parse_gate, parse_gates


def test_absolute_threshold():
    g = parse_gate("rougeL >= 0.2")
    assert (g.metric, g.op, g.ref, g.threshold(None)) == ("rougeL", ">=", None, 0.2)


def test_scaled_reference():
    g = parse_gate("perplexity <= 0.9 * base")
    assert (g.ref, g.scale, g.offset) == ("base", 0.9, 0.0)
    assert g.threshold(10.0) == pytest.approx(9.0)
    assert parse_gate("perplexity <= base * 0.9").scale == 0.9


def test_offset_reference():
    assert parse_gate("crows_pct_stereotype <= base + 2").threshold(50.0) == pytest.approx(52.0)
    assert parse_gate("token_f1 > production - 0.05").threshold(0.5) == pytest.approx(0.45)


def test_scaled_and_offset_reference():
    g = parse_gate("loss < 1.1 * production + 0.5")
    assert (g.op, g.ref, g.scale, g.offset) == ("<", "production", 1.1, 0.5)


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        parse_gates(EvaluationConfig(gates=["rougeL >= 0.1", "bleu >= 0.3"]))
    text = str(err.value)
    assert "gates[1] `bleu >= 0.3`: unknown metric 'bleu'" in text
    assert "rougeL" in text and "crows_pct_stereotype" in text and "cf_refusal_gap" in text


@pytest.mark.parametrize(
    "text", ["rougeL = 0.2", "rougeL >=", ">= 0.2", "rougeL >= champion", "rougeL >= 2 * base * 3"]
)
def test_malformed_gate_is_an_error(text):
    with pytest.raises(ConfigError, match="gates\\[0\\]"):
        parse_gates(EvaluationConfig(gates=[text]))


def test_gate_on_a_suite_that_does_not_run():
    with pytest.raises(ConfigError, match=r"'crows' suite, which evaluation\.suites does not run"):
        parse_gates(EvaluationConfig(suites=["quality"], gates=["crows_pct_stereotype <= 60"]))


def test_gate_on_a_comparison_that_is_switched_off():
    with pytest.raises(ConfigError, match="compare_base is false"):
        parse_gates(EvaluationConfig(compare_base=False, gates=["rougeL >= base"]))
    with pytest.raises(ConfigError, match="compare_production is false"):
        parse_gates(EvaluationConfig(compare_production=False, gates=["rougeL >= production"]))


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_gates(EvaluationConfig(gates=["bleu > 1", "rougeL ~ 2", "loss <= 3"]))
    assert err.value.problems[0].startswith("evaluation.gates[0]") and len(err.value.problems) == 2


def test_judge_relative_to_base_with_paired_bootstrap():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.4, size=30)
    model = base + 0.1  # better on every item
    metrics = {"model": {"rougeL": mean_metric(model)}, "base": {"rougeL": mean_metric(base)}}
    [up, down] = judge([parse_gate("rougeL >= base + 0.05"), parse_gate("rougeL <= base")], metrics, 500, 0.95, 1)
    assert up.passed and not down.passed
    assert up.threshold == pytest.approx(base.mean() + 0.05)
    # paired resampling: the margin is exactly +0.05 on every resample
    assert up.margin_ci == pytest.approx((0.05, 0.05))
    assert up.ci[0] < model.mean() < up.ci[1]


def test_gate_on_ci_is_stricter_than_the_point_estimate():
    values = np.r_[np.ones(6), np.zeros(4)]  # mean 0.6 from 10 items: a wide interval
    metrics = {"model": {"token_f1": mean_metric(values)}}
    gate = parse_gate("token_f1 >= 0.5")
    assert judge([gate], metrics, 500, 0.95, 0)[0].passed
    strict = judge([gate], metrics, 500, 0.95, 0, gate_on_ci=True)[0]
    assert not strict.passed and strict.ci[0] < 0.5


def test_missing_metric_fails_and_missing_production_is_not_applicable():
    metrics = {"model": {"rougeL": mean_metric([0.5, 0.6])}}
    exact, prod = judge([parse_gate("exact_match >= 0.1"), parse_gate("rougeL >= production")], metrics, 100, 0.9, 0)
    assert not exact.passed and exact.note == "not measured"
    assert prod.passed and prod.note == "n/a: no production"


def test_bootstrap_interval_of_a_mean_covers_it_and_shrinks_with_n():
    rng = np.random.default_rng(3)
    small, large = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    widths = []
    for sample in (small, large):
        metric = mean_metric(sample)
        lo, hi = interval(metric.resample(draws(metric.n, 1000, rng)), 0.95)
        assert lo < sample.mean() < hi
        widths.append(hi - lo)
        # close to the normal-theory interval 2 * 1.96 * s / sqrt(n)
        assert widths[-1] == pytest.approx(2 * 1.96 * sample.std() / np.sqrt(sample.size), rel=0.2)
    assert widths[1] < widths[0] / 5


def test_ratio_metric_resamples_numerator_and_denominator_together():
    nll, tokens = np.array([10.0, 3.0]), np.array([5.0, 1.0])
    metric = ratio_metric(nll, tokens, np.exp)
    assert metric.value == pytest.approx(np.exp(13.0 / 6.0))  # token-weighted, not a mean of ratios
    assert metric.stat(np.array([0, 0])) == pytest.approx(np.exp(2.0))
    assert metric.stat(np.array([1, 1])) == pytest.approx(np.exp(3.0))


# --- interval bounds and paired differences -------------------------------------------------------------------


def test_bound_on_the_left_side_is_parsed():
    g = parse_gate("crows_pct_stereotype.upper <= base + 5")
    assert (g.metric, g.bound, g.ref, g.offset, g.paired) == ("crows_pct_stereotype", "upper", "base", 5.0, None)
    assert parse_gate("rougeL.lower >= base").bound == "lower"


def test_paired_difference_is_parsed():
    g = parse_gate("(crows_pct_stereotype - base).upper <= 5")
    assert (g.metric, g.paired, g.bound, g.ref, g.threshold(None)) == ("crows_pct_stereotype", "base", "upper", None, 5)
    assert parse_gate("(rougeL - production) >= -0.01").bound is None


def test_unknown_bound_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown interval bound '\.mean': use \.lower or \.upper"):
        parse_gates(EvaluationConfig(gates=["rougeL.mean >= 0.2"]))


def test_lower_bound_must_be_compared_from_below():
    with pytest.raises(ConfigError, match="a lower bound is compared with >= or >"):
        parse_gates(EvaluationConfig(gates=["crows_pct_stereotype.lower <= 60"]))


def test_upper_bound_must_be_compared_from_above():
    with pytest.raises(ConfigError, match="an upper bound is compared with <= or <"):
        parse_gates(EvaluationConfig(gates=["rougeL.upper >= base"]))


def test_paired_difference_subtracts_base_or_production_only():
    with pytest.raises(ConfigError, match="subtracts base or production, not 'champion'"):
        parse_gates(EvaluationConfig(gates=["(rougeL - champion).lower >= 0"]))


def test_paired_difference_threshold_is_a_number():
    with pytest.raises(ConfigError, match="threshold of a paired difference is a number"):
        parse_gates(EvaluationConfig(gates=["(rougeL - base).lower >= production"]))


def test_malformed_left_side_is_an_error():
    with pytest.raises(ConfigError, match="left side 'rougeL - base' must be METRIC"):
        parse_gates(EvaluationConfig(gates=["rougeL - base >= 0"]))


def test_paired_difference_needs_its_comparison_switched_on():
    with pytest.raises(ConfigError, match="compare_base is false"):
        parse_gates(EvaluationConfig(compare_base=False, gates=["(rougeL - base).lower >= 0"]))


def test_upper_bound_gate_fails_where_the_point_estimate_passes():
    values = np.r_[np.ones(11), np.zeros(19)]  # 36.7% of 30 pairs: a wide interval
    metrics = {"model": {"crows_pct_stereotype": mean_metric(values, scale=100.0)}}
    point, bound = judge(
        [parse_gate("crows_pct_stereotype <= 45"), parse_gate("crows_pct_stereotype.upper <= 45")],
        metrics,
        500,
        0.95,
        0,
    )
    assert point.passed and not bound.passed
    assert bound.decided_on == "upper bound" and bound.compared == pytest.approx(bound.ci[1]) and bound.compared > 45
    assert "upper bound" in bound.describe() and "threshold 45" in bound.describe()


def test_paired_difference_interval_is_tighter_than_either_models_own():
    rng = np.random.default_rng(5)
    base = (rng.uniform(size=300) < 0.55).astype(float)
    model = base.copy()
    model[:6] = 1.0 - model[:6]  # the version changes its preference on 6 of 300 pairs only
    metrics = {
        "model": {"crows_pct_stereotype": mean_metric(model, scale=100.0)},
        "base": {"crows_pct_stereotype": mean_metric(base, scale=100.0)},
    }
    unpaired, paired = judge(
        [parse_gate("crows_pct_stereotype.upper <= base + 3"), parse_gate("(crows_pct_stereotype - base).upper <= 3")],
        metrics,
        1000,
        0.95,
        0,
    )
    assert paired.value == pytest.approx(100 * (model.mean() - base.mean()))
    own_width = unpaired.ci[1] - unpaired.ci[0]
    assert paired.ci[1] - paired.ci[0] < own_width / 3
    assert paired.passed and not unpaired.passed  # same data: only the paired interval sees no real change
    assert paired.threshold == 3.0 and paired.compared == pytest.approx(paired.ci[1])


def test_paired_difference_without_the_same_items_fails_with_a_reason():
    metrics = {"model": {"rougeL": mean_metric([0.5, 0.6, 0.7])}, "base": {"rougeL": mean_metric([0.1, 0.2])}}
    [result] = judge([parse_gate("(rougeL - base).lower >= 0")], metrics, 100, 0.95, 0)
    assert not result.passed and "not measured on the same items" in result.note


def test_gates_of_suites_that_do_not_run_are_set_aside():
    from evaluate.gates import split_by_suite

    applying, skipped = split_by_suite(
        ["rougeL >= base", "(crows_pct_stereotype - base).upper <= 5", "bbq_bias_ambig <= 0.1", "bleu > 1"], ["crows"]
    )
    assert applying == ["(crows_pct_stereotype - base).upper <= 5", "bleu > 1"]  # bad gates still get reported
    assert skipped == ["rougeL >= base", "bbq_bias_ambig <= 0.1"]


def test_a_verdict_with_skipped_gates_is_partial_and_lists_them():
    from evaluate.gates import skipped_result
    from evaluate.verdict import Verdict

    metrics = {"model": {"crows_likelihood_diff": mean_metric([1.0, 2.0])}}
    passing = judge([parse_gate("crows_likelihood_diff >= 0")], metrics, 100, 0.9, 0)
    failing = judge([parse_gate("crows_likelihood_diff >= 5")], metrics, 100, 0.9, 0)
    skipped = [skipped_result("rougeL >= base")]
    verdict = Verdict("m", "1", True, passing, "run", skipped=skipped)
    assert verdict.outcome == "partial"  # promotion takes only "pass"
    text = verdict.summary()
    assert "m/1: PARTIAL" in text and "SKIP  rougeL >= base" in text and "'quality' suite not run" in text
    assert Verdict("m", "1", False, failing, "run", skipped=skipped).outcome == "fail"
