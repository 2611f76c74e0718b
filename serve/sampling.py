"""Next-token choice per row: greedy at temperature 0, else temperature and nucleus (top_p) sampling.

Each sampled row has its own generator, so a request's `seed` fixes its tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

BROKEN = -1  # the token returned for a row whose logits are NaN or infinite (a broken adapter)


def sample(
    logits: torch.Tensor,
    temperatures: list[float],
    top_ps: list[float],
    generators: list[torch.Generator | None],
) -> list[int]:
    """`logits` is `[rows, vocab]`; returns one token id per row, `BROKEN` where the logits are not finite."""
    logits = logits.float()
    bad = (~torch.isfinite(logits).all(dim=1)).tolist()
    out = logits.argmax(dim=1).tolist()
    for i, temp in enumerate(temperatures):
        if bad[i]:
            out[i] = BROKEN
        elif temp <= 0:
            continue
        probs = torch.softmax(logits[i] / temp, dim=-1)
        if top_ps[i] < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > top_ps[i]
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return out


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
