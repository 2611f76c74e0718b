"""Attention over a packed row at the cost of its examples, not of one long sequence.

A packed micro-batch is one row of several examples told apart by position ids that restart at 0. transformers'
SDPA path builds an L x L block mask for it and attends over the whole row; `segmented_attention` instead runs
each example on its own: PyTorch's varlen flash kernel (`torch.nn.attention.varlen.varlen_attn`, one call with
the cumulative boundaries) on CUDA in bf16/fp16. On CPUs in bf16, examples of at most MATH_UP_TO tokens go
through plain matmuls and a softmax, shortest first, in batches right-padded to their longest whose scores fit
the caches (PyTorch's CPU flash backward costs ~10 ms a call at these lengths, 2-4x the whole attention done in
matmuls); longer ones, and every example of an fp32 row, take one causal SDPA call each (its fused kernel, no
mask, no padding). Elsewhere (CUDA without the varlen kernel) the examples are one causal SDPA call, padded to the
longest. Either way the cost is about the sum of the examples' length^2 instead of the row's.
`use_packed_attention` checks it once against the block-mask SDPA on random inputs and falls
back to that path when it is unavailable or disagrees.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKED = "tuneops_packed"  # the attn_implementation name registered with transformers
FALLBACK = "sdpa"  # transformers' block-mask SDPA over the whole row
# Longest example (tokens) attended in matmuls on CPUs. On AMX in bf16 (4 examples, SmolLM2's heads, forward and
# backward, jemalloc) they take 1.0 / 3.0 / 4.8-8.3 / 15.7-16.9 ms at 64 / 140 / 200 / 256 tokens against SDPA's
# 2.3 / 7.2 / 7.0-7.5 / 8.1-9.0: past ~200 tokens the scores outgrow the caches and SDPA's tiled kernel wins.
# In fp32 SDPA's kernel is as fast or faster at every length (1.4 / 5.2 / 10.2 against 1.3 / 7.6 / 17.5 ms at
# 64 / 140 / 200 tokens with AVX2 instructions), so fp32 rows always take it. On CPUs SDPA takes one example a
# call: the padded batch of four examples of 64-190 tokens costs 15.7 ms forward + backward in fp32 (AVX2), one
# call each 7.1 ms; three of 210-300 tokens in bf16, 20.6 against 17.5 ms.
MATH_UP_TO = 200
# Scores (examples x heads x longest^2) of one batch attended in matmuls: ~1.2 MB in bf16, within a core's L2.
SCORES_BUDGET = 600_000


def boundaries(position_ids: torch.Tensor | None, length: int, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Cumulative example boundaries [0, e1, e2, ..., L] of a packed row (int32), or None when not packed.

    Taken from the collator's `cu_seq_lens_q` when it sent them, else from where the position ids restart at 0.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.to(torch.int32)
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0] == 0).nonzero().squeeze(-1)
    if starts.numel() <= 1:
        return None
    end = torch.tensor([length], device=starts.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


def _varlen_kernel(query: torch.Tensor) -> Any:
    """PyTorch's varlen flash-attention kernel where it runs: CUDA, half precision."""
    if query.device.type != "cuda" or query.dtype not in (torch.bfloat16, torch.float16):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def segmented_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: (batch, heads, L, dim) in, (batch, L, heads, dim) out.

    A packed row (batch 1, no cache, query as long as key) is attended example by example; anything else (a
    padded batch, generation with a cache) goes to transformers' SDPA with the mask it was given.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    cu = None
    if query.shape[0] == 1 and key.shape[2] == length and dropout == 0.0:
        cu = boundaries(kwargs.get("position_ids"), length, kwargs)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    kernel = _varlen_kernel(query)
    if kernel is not None:
        max_len = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, heads, dim)
        out = kernel(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0), enable_gqa=gqa)
        return out.unsqueeze(0), None
    return _padded_causal(query, key, value, cu.long(), scaling, gqa), None


def _padded_causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, scaling: float | None, gqa: bool
) -> torch.Tensor:
    """The row's examples in batches zero-padded on the right, one causal attention per batch, real positions
    back.

    Exact: with causal attention a real query sees only earlier positions of its own example, never the padding
    after it, and the padding's own outputs are dropped. The examples are taken shortest first (`_batches`), so a
    batch pads little; each example is split off, padded (`F.pad`) and stacked, and joined back (`cat`): their
    gradients are slices and one copy, where `pad_sequence`'s backward clones the whole batch's gradient once per
    example and gathering by an index costs an accumulating scatter.
    """
    lengths = (cu[1:] - cu[:-1]).tolist()
    cpu = query.device.type == "cpu"
    in_matmuls = cpu and query.dtype != torch.float32
    parts = [t[0].split(lengths, dim=1) for t in (query, key, value)]  # per example: (heads, length, dim)
    pieces: list[torch.Tensor | None] = [None] * len(lengths)
    for group, matmuls in _batches(lengths, query.shape[1], in_matmuls, sdpa_per_example=cpu):
        longest = lengths[group[-1]]
        q, k, v = (_stacked([p[i] for i in group], longest) for p in parts)
        if matmuls:
            out = _causal_in_matmuls(q, k, v, scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        # unbind, not out[i]: its backward stacks the examples' gradients once, where each out[i] would zero a
        # gradient the size of the whole batch
        for i, example in zip(group, out.transpose(1, 2).unbind(0), strict=True):
            pieces[i] = example[: lengths[i]]
    return torch.cat(pieces).unsqueeze(0)  # type: ignore[arg-type]


def _batches(
    lengths: list[int], heads: int, in_matmuls: bool, sdpa_per_example: bool = False
) -> list[tuple[list[int], bool]]:
    """The examples (indices, shortest first) grouped into attention calls, each with whether it runs in matmuls.

    In matmuls (`in_matmuls` and at most MATH_UP_TO tokens), a batch takes examples while its scores
    (examples x heads x longest^2) fit SCORES_BUDGET: one batch's scores then stay in the CPU's caches, where
    one batch of every example would stream them through memory (4 -> 16 examples of 60-200 tokens cost 8 -> 57
    ms a layer as one batch, 4.5 -> 25 ms in such batches). Everything else goes to SDPA's tiled kernel: one
    call per example with `sdpa_per_example` (CPUs: no padding to compute or copy), else one padded batch.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    short = [i for i in order if in_matmuls and lengths[i] <= MATH_UP_TO]
    rest = [i for i in order if not (in_matmuls and lengths[i] <= MATH_UP_TO)]
    batches: list[tuple[list[int], bool]] = []
    for i in short:
        if batches and (len(batches[-1][0]) + 1) * heads * lengths[i] ** 2 <= SCORES_BUDGET:
            batches[-1][0].append(i)
        else:
            batches.append(([i], True))
    if rest and sdpa_per_example:
        batches.extend(([i], False) for i in rest)
    elif rest:
        batches.append((rest, False))
    return batches


def _stacked(examples: list[torch.Tensor], longest: int) -> torch.Tensor:
    """(heads, length, dim) examples as one (examples, heads, longest, dim) batch, zero-padded on the right."""
    if len(examples) == 1 and examples[0].shape[1] == longest:
        return examples[0].unsqueeze(0)
    return torch.stack([F.pad(e, (0, 0, 0, longest - e.shape[1])) for e in examples])


def _causal_in_matmuls(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Causal attention as two matmuls and a softmax: (n, heads, L, dim) in and out.

    Query heads that share a key/value head (grouped-query attention) are folded into its length axis, so keys
    and values are never repeated.
    """
    n, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    # The scale on the queries (dim wide), not on the scores (length wide); the mask written into the scores.
    scores = (query * scale).reshape(n, kv_heads, group * length, dim) @ key.transpose(-1, -2)
    future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    scores = scores.view(n, kv_heads, group, length, length).masked_fill_(future, float("-inf"))
    weights = torch.softmax(scores, -1)  # PyTorch accumulates a bf16 softmax in fp32 itself
    return (weights.view(n, kv_heads, group * length, length) @ value).view(n, heads, length, dim)


@functools.cache
def _register() -> None:
    """Register the packed attention (and its mask, which is SDPA's, for the fallback inside it) once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    # Left out of compiled layers (training.compile): it splits the row at boundaries read from the data.
    AttentionInterface.register(PACKED, torch.compiler.disable(segmented_attention))
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)


def _agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """One check on random inputs: the packed kernel equals the block-mask SDPA reference, outputs and gradients.
    Short examples take the matmul path on CPUs, and one past MATH_UP_TO takes SDPA's kernel."""
    return all(_agrees_on(device, dtype, lengths) for lengths in ([5, 11, 3], [MATH_UP_TO + 9, 4]))


def _agrees_on(device: torch.device, dtype: torch.dtype, lengths: list[int]) -> bool:
    gen = torch.Generator().manual_seed(0)
    total, heads, kv_heads, dim = sum(lengths), 4, 2, 16
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    tensors = [
        torch.randn(1, h, total, dim, generator=gen).to(device, dtype).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    ]
    q, k, v = tensors
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    mask = (causal & (doc[:, None] == doc[None, :]))[None, None]
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    module = torch.nn.Module()
    out, _ = segmented_attention(module, q, k, v, None, position_ids=position_ids)
    if out.shape != reference.shape:
        return False
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    grads = torch.autograd.grad(out.float().sum(), tensors)
    ref_grads = torch.autograd.grad(reference.float().sum(), tensors)
    return torch.allclose(out.float(), reference.float(), atol=tol, rtol=tol) and all(
        torch.allclose(a.float(), b.float(), atol=tol, rtol=tol) for a, b in zip(grads, ref_grads, strict=True)
    )


@functools.cache
def packed_attention_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the packed attention passes its one-time check on this device and dtype (cached per process)."""
    try:
        return _agrees(torch.device(device_type), dtype)
    except Exception as exc:  # any failure of the kernel means the fallback, never a failed job
        log.warning("packed attention failed its check on %s (%s: %s)", device_type, type(exc).__name__, exc)
        return False


def kernel_name(device: torch.device, dtype: torch.dtype) -> str:
    """What `segmented_attention` runs on this device and dtype, for the log."""
    if _varlen_kernel(torch.empty(0, device=device, dtype=dtype)) is not None:
        return "varlen flash attention (torch.nn.attention.varlen)"
    if device.type == "cpu":
        if dtype == torch.float32:
            return "one causal SDPA call per example"
        return f"examples up to {MATH_UP_TO} tokens in matmuls, in padded batches; longer ones one SDPA call each"
    return "causal SDPA over the examples padded to the longest"


def use_packed_attention(model: Any, device: torch.device, dtype: torch.dtype) -> str:
    """Switch a model (or a peft model around it) to packed attention when it passes its check; returns the name
    of what attention now runs, which is logged. Models transformers cannot switch keep their own."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(base.config, "_attn_implementation", None)
    if current not in (FALLBACK, PACKED):
        log.info("attention: %s (the model's own; packed attention replaces only sdpa)", current)
        return str(current)
    _register()
    if packed_attention_works(device.type, dtype):
        base.set_attn_implementation(PACKED)
        chosen = f"{PACKED}: {kernel_name(device, dtype)}"
    else:
        base.set_attn_implementation(FALLBACK)
        chosen = f"{FALLBACK}: block mask over the packed row (fallback)"
    log.info("attention: %s", chosen)
    return chosen
