"""Next-token choice per row: greedy at (near) zero temperature, else temperature and nucleus (top_p) sampling.

Each sampled row has its own generator, so a request's `seed` fixes its tokens whatever else is in the batch.
No row's parameters can make sampling raise: a seed of any size is reduced into the generator's range, a
temperature too small to divide by safely means greedy, and a top_p at or below zero keeps the top token.
Only non-finite logits (a broken adapter) give `BROKEN`, for the caller to fail that row alone.
"""

from __future__ import annotations

import torch

BROKEN = -1  # the token returned for a row whose logits are NaN or infinite (a broken adapter)
MIN_TEMPERATURE = 1e-5  # below it (or NaN) a row is greedy: dividing by it is numerically meaningless
SEED_SPACE = 2**64  # torch generators take seeds in [0, 2**64); negative seeds wrap as torch wraps them


def is_greedy(temperature: float) -> bool:
    return not temperature >= MIN_TEMPERATURE  # written so that NaN is greedy too


def sample(
    logits: torch.Tensor,
    temperatures: list[float],
    top_ps: list[float],
    generators: list[torch.Generator | None],
) -> list[int]:
    """`logits` is `[rows, vocab]`; returns one token id per row, `BROKEN` where the logits are not finite.

    Work is in float32 and per row, so a row's token never depends on the other rows of the batch.
    """
    logits = logits.float()
    finite = torch.isfinite(logits).all(dim=1).tolist()
    out = logits.argmax(dim=1).tolist()
    for i, temp in enumerate(temperatures):
        if not finite[i]:
            out[i] = BROKEN
        elif generators[i] is not None and not is_greedy(temp):
            out[i] = _draw(logits[i], temp, top_ps[i], generators[i])
    return out


def _draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from finite `logits` at `temperature` (> 0, possibly inf) within the top_p nucleus.

    The maximum is subtracted before dividing, so the scaled logits lie in [-inf, 0] with the top token at 0:
    the probabilities are finite and the top token's is positive for every temperature.
    """
    scaled = (logits - logits.max()) / temperature
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:  # False for NaN: no nucleus
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > top_p
        drop[0] = False  # the top token always stays (top_p <= 0 keeps only it)
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator seeded with `seed` reduced modulo 2**64 (any int works), or randomly when it is None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed) % SEED_SPACE)
    return gen
