"""Micro-batches by token budget: a packed row as long as the budget allows, whatever the examples' lengths."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence


def budget_batches(lengths: Sequence[int], budget: int, seed: int) -> list[list[int]]:
    """Example indices in a seeded shuffled order, cut into runs whose tokens fit `budget` (at least one each).

    An example longer than the budget trains alone; every example appears exactly once.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


class TokenBudgetSampler:
    """A DataLoader batch sampler of token-budget micro-batches.

    The batches are cut once (seeded) so their number, and with it the Trainer's steps per epoch and the
    learning-rate schedule, is fixed; each epoch visits them in a new seeded order (`set_epoch`).
    """

    def __init__(self, lengths: Sequence[int], budget: int, seed: int) -> None:
        self.batches = budget_batches(lengths, budget, seed)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.batches)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        for i in order:
            yield self.batches[i]
