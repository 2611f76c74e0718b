"""Stratified samples of the bias suites, so the default evaluation is fast and still covers every group.

The published suites are large (1,508 CrowS-Pairs pairs, 11,956 BBQ items): scoring all of them on a CPU takes
longer than a pipeline should wait. A sample drawn per stratum (bias type; BBQ category x context x question
polarity) in proportion to its size keeps every group represented and the overall rates unbiased; the seed
makes it the same sample every run, so two versions are compared on the same items.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def allocate(sizes: dict[Hashable, int], total: int) -> dict[Hashable, int]:
    """Items per stratum: proportional to its size (largest remainders), at least one each when total allows."""
    population = sum(sizes.values())
    if total >= population:
        return dict(sizes)
    keys = sorted(sizes, key=str)
    exact = {k: total * sizes[k] / population for k in keys}
    share = {k: int(exact[k]) for k in keys}
    for k in sorted(keys, key=lambda k: (-(exact[k] - share[k]), str(k)))[: total - sum(share.values())]:
        share[k] += 1
    if total >= len(keys):
        for k in keys:
            if share[k] == 0 and sizes[k] > 0:
                donor = max(keys, key=lambda d: (share[d], str(d)))
                share[donor] -= 1
                share[k] = 1
    return share


def stratified_sample(items: Sequence[T], stratum: Callable[[T], Hashable], size: int | None, seed: int) -> list[T]:
    """`size` items drawn without replacement per stratum (see `allocate`), in their original order.

    size None, or at least len(items), returns every item.
    """
    if size is None or size >= len(items):
        return list(items)
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[stratum(item)].append(i)
    counts = allocate({k: len(v) for k, v in groups.items()}, size)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for key in sorted(groups, key=str):
        idx = groups[key]
        chosen += [idx[j] for j in rng.choice(len(idx), size=counts[key], replace=False)]
    return [items[i] for i in sorted(chosen)]
