"""Linear layers on CPU weights packed once into oneDNN's blocked layout, for bf16 inference.

`F.linear` hands oneDNN a plain row-major bf16 weight, and oneDNN reorders it into its blocked (AMX /
AVX512-BF16) layout on every call. For the few rows of a decode step that reorder costs about as much as the
product itself. Packing every weight once, as torch.compile's CPU weight freezing does, made one decode step of
SmolLM2-135M 1.2x faster at 1 row and at 16 rows (bf16, AMX; docs/benchmarks.md has the served figures).
fp32 gained nothing at one row, so only bf16 weights are packed. The gateway and evaluation use it.

A packed copy tracks its weight's version counter: when the weight changes in place (the gateway merges another
version into it, evaluation merges each version in turn), the next call packs it again, so packing can never
serve stale weights. The plain weight stays (merging, widening and gradients read it); the packed copy costs as
much memory again.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)


@functools.cache
def _ops_work() -> bool:
    """Whether this torch build packs and multiplies bf16 weights in oneDNN, and agrees with `F.linear`."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=generator).to(torch.bfloat16)
        x = torch.randn(3, 40, generator=generator).to(torch.bfloat16)
        got = torch.ops.mkldnn._linear_pointwise(x, pack(weight), None, "none", [], "")
    except Exception as exc:  # a build without these ops: plain F.linear
        log.info("packed linear weights unavailable here (%s)", exc)
        return False
    return bool(torch.allclose(got.float(), F.linear(x, weight).float(), atol=0.05, rtol=0.02))


def packing_applies(dtype: torch.dtype, device: torch.device) -> bool:
    """Packing is for bf16 weights on CPUs where torch's oneDNN ops run."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _ops_work()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (`[out, in]`, bf16, CPU) in oneDNN's blocked layout, for `multiply`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def multiply(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` on the weight `pack` returned."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Linear):
    """An `nn.Linear` that multiplies by a packed copy of its weight, packed again whenever the weight changes.

    It shares the original layer's parameters. Calls that need gradients, or inputs of another dtype, take the
    plain `F.linear`.
    """

    _packed: torch.Tensor | None = None
    _packed_version: int = -1

    @classmethod
    def replacing(cls, linear: nn.Linear) -> PackedLinear:
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        packed.in_features, packed.out_features = linear.in_features, linear.out_features
        packed.weight = linear.weight
        packed.bias = linear.bias
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.dtype != weight.dtype or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)):
            return F.linear(x, weight, self.bias)
        if self._packed is None or self._packed_version != weight._version:
            self._packed = pack(weight)
            self._packed_version = weight._version
        return multiply(x, self._packed, self.bias)


def pack_linears(model: nn.Module) -> int:
    """Replace every bf16 CPU `nn.Linear` of `model` by a `PackedLinear` on the same parameters; how many.

    Weights made under `torch.inference_mode` have no version counter, so nothing could tell when they change:
    their layers stay plain.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            weight = child.weight
            if not weight.is_inference() and packing_applies(weight.dtype, weight.device):
                setattr(parent, name, PackedLinear.replacing(child))
                replaced += 1
    return replaced
