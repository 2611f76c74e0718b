"""The one-exponential summed cross-entropy against PyTorch's own, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune.cross_entropy import cross_entropy_sum


def _logits(dtype: torch.dtype, rows: int = 7, vocabulary: int = 301, spread: float = 30.0) -> torch.Tensor:
    torch.manual_seed(0)
    # Large values as well: exp() of them overflows fp32 unless the row maximum is taken off first.
    logits = torch.randn(rows, vocabulary) * spread
    logits[0, 3] = 1000.0
    return logits.to(dtype)


def _loss_and_grad(fn, logits: torch.Tensor, targets: torch.Tensor, upstream: float) -> tuple[float, torch.Tensor]:
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets)
    (loss * upstream).backward()
    return loss.item(), x.grad


def test_loss_and_gradients_equal_pytorch_cross_entropy_in_fp32():
    logits = _logits(torch.float32)
    targets = torch.tensor([3, 0, 300, 17, 17, 5, 150])
    want = _loss_and_grad(lambda x, t: F.cross_entropy(x, t, reduction="sum"), logits, targets, 0.37)
    got = _loss_and_grad(cross_entropy_sum, logits, targets, 0.37)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_bf16_logits_get_a_bf16_gradient_of_the_fp32_loss():
    logits = _logits(torch.bfloat16)
    targets = torch.tensor([3, 1, 2, 4, 5, 6, 7])
    want = _loss_and_grad(lambda x, t: F.cross_entropy(x.float(), t, reduction="sum"), logits, targets, 1.0)
    got = _loss_and_grad(cross_entropy_sum, logits, targets, 1.0)
    assert got[1].dtype == torch.bfloat16
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    torch.testing.assert_close(got[1], want[1])


def test_the_logits_are_left_as_they_were():
    logits = _logits(torch.float32)
    before = logits.clone()
    cross_entropy_sum(logits.requires_grad_(), torch.zeros(7, dtype=torch.long)).backward()
    assert torch.equal(logits.detach(), before)


def test_a_second_backward_through_the_same_graph_is_refused():
    """The backward writes the gradient into the saved softmax; a second one would read that, not the softmax."""
    x = _logits(torch.float32).requires_grad_()
    loss = cross_entropy_sum(x, torch.zeros(7, dtype=torch.long))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="used by a backward already"):
        loss.backward()
