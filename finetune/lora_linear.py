"""LoRA layers that add their low-rank product inside the base layer's output on CPUs, forward and backward.

peft computes `result + lora_B(lora_A(x)) * scaling`: besides the two small matmuls, the scaling and the add each
pass over the layer's whole `[tokens, out]` output, and backward passes over it again for the scaling and adds
the two input gradients. On CPUs such passes are bound by memory, not arithmetic: for a 1536-wide layer on 600
tokens a bf16 multiply or add takes ~130 us, a fifth of the base matmul. `LoraMatmul` computes the same numbers
with the scaling moved onto the rank-r side and the adds done by the matmuls themselves (`addmm_`): one pass over
the output for the low-rank product instead of three, and one over the input gradient instead of an extra add.

`fuse_lora_layers` installs it as the forward of every plain LoRA linear layer of a peft model (one adapter, no
dropout, no DoRA or other variant, an unquantized `nn.Linear` base); any call it does not fit (a merged or
disabled adapter, several adapters, mixed-batch adapter names) goes to peft's own forward. The parameters, their
names and the saved adapter are peft's, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class LoraMatmul(torch.autograd.Function):
    """`x W^T + b + scaling * (x A^T) B^T` with the adds inside the matmuls; grads for x, A and B only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        low = flat @ a.t()  # [tokens, r]
        out = F.linear(flat, weight, bias)
        out.addmm_(low, b.t(), alpha=scaling)
        ctx.save_for_backward(flat, low, weight, a, b)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        flat, low, weight, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        needs_x, _, _, needs_a, needs_b, _ = ctx.needs_input_grad
        g_low = (g @ b).mul_(ctx.scaling)  # [tokens, r]: the scaling on the narrow side
        grad_b = (g.t() @ low).mul_(ctx.scaling) if needs_b else None
        grad_a = g_low.t() @ flat if needs_a else None
        grad_x = (g @ weight).addmm_(g_low, a).view(ctx.x_shape) if needs_x else None
        return grad_x, None, None, grad_a, grad_b, None


def _fits(layer: Any) -> bool:
    """A plain LoRA linear layer: one adapter, no dropout, no variant, no LoRA bias, an `nn.Linear` base."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(layer, LoraLinear) or type(layer.get_base_layer()) is not nn.Linear:
        return False
    if len(layer.lora_A) != 1 or getattr(layer, "lora_variant", None) or any(layer.use_dora.values()):
        return False
    (name,) = layer.lora_A.keys()
    return isinstance(layer.lora_dropout[name], nn.Identity) and layer.lora_B[name].bias is None


def _fused_forward(layer: Any) -> Any:
    peft_forward = type(layer).forward
    (name,) = layer.lora_A.keys()
    base = layer.get_base_layer()

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (
            args
            or kwargs
            or layer.disable_adapters
            or layer.merged
            or layer.active_adapters != [name]
            or x.dtype != base.weight.dtype
            or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)  # lora.bias all / lora_only: peft trains it
        ):
            return peft_forward(layer, x, *args, **kwargs)
        a = layer.lora_A[name].weight.to(x.dtype)  # the fp32 master factors, cast as autocast would
        b = layer.lora_B[name].weight.to(x.dtype)
        return LoraMatmul.apply(x, base.weight, base.bias, a, b, float(layer.scaling[name]))

    return forward


def fuse_lora_layers(model: nn.Module) -> int:
    """Install `LoraMatmul` as the forward of every LoRA layer of `model` it fits; how many."""
    fused = 0
    for module in model.modules():
        if _fits(module):
            module.forward = _fused_forward(module)
            fused += 1
    return fused
