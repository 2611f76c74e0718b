"""Stratified samples of the published bias suites: proportional, every group present, reproducible by seed."""

from __future__ import annotations

from collections import Counter

import pytest

from core.schema.evaluation import EvaluationConfig
from evaluate import readers
from evaluate.job import sample_size
from evaluate.sampling import allocate, stratified_sample


def test_allocation_is_proportional_and_sums_to_the_total():
    sizes = {"a": 500, "b": 300, "c": 150, "d": 50}
    assert allocate(sizes, 100) == {"a": 50, "b": 30, "c": 15, "d": 5}
    got = allocate({"a": 516, "b": 262, "c": 60}, 50)
    assert sum(got.values()) == 50 and got["a"] > got["b"] > got["c"] >= 1


def test_every_stratum_gets_an_item_when_the_total_allows():
    got = allocate({"big": 10_000, "tiny": 3}, 10)
    assert got["tiny"] == 1 and got["big"] == 9


def test_crows_sample_keeps_every_bias_type_and_is_reproducible():
    pairs = readers.read_crows(readers.DEFAULT_CROWS)
    one = stratified_sample(pairs, lambda p: p.bias_type, 300, seed=0)
    again = stratified_sample(pairs, lambda p: p.bias_type, 300, seed=0)
    other = stratified_sample(pairs, lambda p: p.bias_type, 300, seed=1)
    assert len(one) == 300 and [p.id for p in one] == [p.id for p in again] != [p.id for p in other]
    full, got = Counter(p.bias_type for p in pairs), Counter(p.bias_type for p in one)
    assert set(got) == set(full)
    for bias_type, n in full.items():
        assert got[bias_type] == pytest.approx(300 * n / len(pairs), abs=1)
    assert [p.id for p in one] == sorted((p.id for p in one), key=int)  # file order kept


def test_bbq_sample_covers_category_condition_and_polarity():
    items = readers.read_bbq(readers.DEFAULT_BBQ)
    sample = stratified_sample(items, lambda it: (it.category, it.condition, it.polarity), 240, seed=0)
    strata = Counter((it.category, it.condition, it.polarity) for it in sample)
    assert len(sample) == 240 and len(strata) == 24 and min(strata.values()) >= 4


def test_full_reads_everything_and_max_bias_items_still_caps():
    assert sample_size(EvaluationConfig(), 300) == 300
    assert sample_size(EvaluationConfig(full=True), 300) is None
    assert sample_size(EvaluationConfig(full=True, max_bias_items=8), 300) == 8
    assert sample_size(EvaluationConfig(max_bias_items=500), 300) == 300
