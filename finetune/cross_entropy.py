"""Summed cross-entropy over the trained positions' vocabulary-wide logits, one exponential per logit.

`F.cross_entropy` takes a log-softmax forward (an exponential of every logit, and a written log-probability
each), then its backward fills a zero gradient of every logit for the NLL and takes a second exponential of
every log-probability. On a CPU the exponentials bound it: on 2 cores, 450 positions of a 49k vocabulary take
~95 ms forward + backward. Here the forward keeps the softmax numerators it computes anyway and the backward
scales them in place: half the exponentials, no zero-fill, ~50 ms, as fast as the compiled loss without
compiling, the same loss and gradients to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch


class SoftmaxCrossEntropySum(torch.autograd.Function):
    """`sum_i logsumexp(logits_i) - logits_i[targets_i]` in fp32; every target a real class (no ignore index).

    The backward reuses the saved numerators as the gradient's storage, so a graph through it can be
    differentiated once (a second backward, `retain_graph=True`, raises instead of returning wrong gradients).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = logits.float()
        top = x.amax(dim=-1, keepdim=True)
        numerators = torch.sub(x, top).exp_()  # a fresh tensor: the input stays as it was
        total = numerators.sum(dim=-1, keepdim=True)
        picked = x.gather(-1, targets.unsqueeze(-1))
        ctx.save_for_backward(numerators, total, targets)
        ctx.input_dtype = logits.dtype
        ctx.spent = False
        return (total.log() + top - picked).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        if ctx.spent:
            raise RuntimeError("cross_entropy_sum: its saved softmax was used by a backward already")
        ctx.spent = True
        numerators, total, targets = ctx.saved_tensors
        grad_logits = numerators.mul_(grad / total)  # softmax x upstream gradient, in place
        grad_logits.scatter_add_(-1, targets.unsqueeze(-1), (-grad).expand_as(total).to(grad_logits.dtype))
        return grad_logits.to(ctx.input_dtype), None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in fp32 of `[positions, vocabulary]` logits against `[positions]` class indices."""
    return SoftmaxCrossEntropySum.apply(logits, targets)
