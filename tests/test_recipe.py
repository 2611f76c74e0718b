"""The training recipe's pieces: packed attention, the loss at trained positions, token-budget batches."""

import logging

import pytest
import torch
from pydantic import ValidationError

from core.models import load_causal_lm, load_tokenizer
from core.schema.training import TrainingConfig
from finetune import attention
from finetune.attention import FALLBACK, PACKED, use_packed_attention
from finetune.batching import TokenBudgetSampler, budget_batches
from finetune.prepare import IGNORE, Tokenized
from finetune.recipe import fused_loss_applies, trained_logits_loss

PAIRS = [
    ("What is a permit?", "A written approval."),
    ("Is a carport a building?", "Yes, when it has a roof and stands on a foundation."),
    ("Who inspects?", "The city."),
]
CUDA = torch.cuda.is_available()


def _rows(tok, pairs):
    rows = []
    for text, answer in pairs:
        p = tok(text, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(Tokenized(p + a, [IGNORE] * len(p) + a, "x", []))
    return rows


def _packed(rows, device="cpu", boundaries=False):
    """One packed row as the recipe's collator makes it; `boundaries`: with cu_seq_lens as make_trainer asks."""
    from transformers import DataCollatorWithFlattening

    batch = DataCollatorWithFlattening(
        return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=boundaries
    )([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
    return {k: v if isinstance(v, int) else torch.as_tensor(v).to(device) for k, v in batch.items()}


def _example_losses(model, rows, batch, **extra) -> list[torch.Tensor]:
    """Each example's mean next-token loss, read out of one forward pass over `batch`."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False, **extra).logits[0].float()
    labels = batch["labels"][0]
    token_loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="none", ignore_index=IGNORE)
    trained = labels[1:] != IGNORE
    out, start = [], 0
    for r in rows:
        end = start + len(r.input_ids)
        span = slice(start, end - 1)  # predictions made inside this example (its last one looks at the next)
        out.append(token_loss[span][trained[span]].mean())
        start = end
    return out


@pytest.mark.parametrize("implementation", [PACKED, FALLBACK])
def test_each_example_in_a_packed_row_has_its_loss_alone(tiny_base, implementation):
    """No attention crosses packed examples, on every CPU attention path: each example's loss inside the row is
    its loss alone. Plain causal attention over the same row (boundaries ignored) changes the later examples."""
    attention._register()
    model = load_causal_lm(tiny_base, torch.device("cpu"), torch.float32).eval()
    model.set_attn_implementation(implementation)
    rows = _rows(load_tokenizer(tiny_base), PAIRS)
    batch = _packed(rows)
    with torch.no_grad():
        alone = [_example_losses(model, [r], _packed([r]))[0] for r in rows]
        packed = _example_losses(model, rows, batch)
        with_boundaries = _example_losses(model, rows, _packed(rows, boundaries=True))
        # Plain causal attention over the same row: SDPA given an all-ones mask sees one sequence.
        model.set_attn_implementation("sdpa")
        leaked = _example_losses(model, rows, batch, attention_mask=torch.ones_like(batch["input_ids"]))
    torch.testing.assert_close(torch.stack(packed), torch.stack(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(with_boundaries), torch.stack(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaked[0], alone[0], rtol=1e-5, atol=1e-5)  # the first sees nothing before it
    for i in (1, 2):
        assert abs(float(leaked[i] - alone[i])) > 1e-4, f"example {i}: a leak would change its loss"


@pytest.mark.parametrize(
    ("lengths", "dtype", "budget", "calls"),
    [
        ([5, 11, 3], torch.bfloat16, attention.SCORES_BUDGET, {"matmuls": 1, "sdpa": 0}),
        ([5, 11, 3, 8], torch.bfloat16, 6 * 9**2 * 2, {"matmuls": 3, "sdpa": 0}),
        (
            [attention.MATH_UP_TO + 9, 4, attention.MATH_UP_TO + 2, 7],
            torch.bfloat16,
            attention.SCORES_BUDGET,
            {"matmuls": 1, "sdpa": 2},
        ),
        ([5, 11, 3], torch.float32, attention.SCORES_BUDGET, {"matmuls": 0, "sdpa": 3}),
    ],
    ids=["short-bf16", "short-bf16-small-budget", "mixed-bf16", "short-fp32"],
)
def test_packed_attention_equals_the_block_mask_on_cpu_in_matmuls_or_sdpa(monkeypatch, lengths, dtype, budget, calls):
    """bf16 examples of at most MATH_UP_TO tokens are attended in matmuls, in batches whose scores fit the budget;
    longer ones, and fp32 rows (where PyTorch's CPU flash kernel is as fast), by SDPA's kernel, one call per
    example. Each gives the block-mask reference's outputs and gradients (grouped-query heads included)."""
    counted = {"matmuls": 0, "sdpa": 0}
    sdpa, in_matmuls = attention.F.scaled_dot_product_attention, attention._causal_in_matmuls

    def counting(name, function):
        def call(*args, **kwargs):
            counted[name] += 1
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting("sdpa", sdpa))
    monkeypatch.setattr(attention, "_causal_in_matmuls", counting("matmuls", in_matmuls))
    monkeypatch.setattr(attention, "SCORES_BUDGET", budget)
    gen = torch.Generator().manual_seed(1)
    total = sum(lengths)
    q, k, v = (torch.randn(1, h, total, 16, generator=gen).to(dtype).requires_grad_() for h in (6, 2, 2))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    out, _ = attention.segmented_attention(torch.nn.Module(), q, k, v, None, position_ids=position_ids)
    assert counted == calls
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (torch.ones(total, total, dtype=torch.bool).tril() & (doc[:, None] == doc[None, :]))[None, None]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    reference = sdpa(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, reference, atol=tol, rtol=tol)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(reference.float().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_attention_batches_take_every_example_once_shortest_first_within_the_budget():
    lengths = [150, 9, attention.MATH_UP_TO + 1, 40, 38, 120, 7, 500]
    heads = 9
    batches = attention._batches(lengths, heads, in_matmuls=True)
    order = [i for group, _ in batches for i in group]
    assert sorted(order) == list(range(len(lengths)))
    for group, matmuls in batches:
        assert [lengths[i] for i in group] == sorted(lengths[i] for i in group)
        longest = max(lengths[i] for i in group)
        if matmuls:
            assert longest <= attention.MATH_UP_TO
            assert len(group) == 1 or len(group) * heads * longest**2 <= attention.SCORES_BUDGET
    assert batches[-1] == ([2, 7], False)  # past MATH_UP_TO: one SDPA batch
    assert len([b for b in batches if b[1]]) > 1  # 150 and 120 do not share a batch with the rest
    shortest_first = sorted(range(8), key=lengths.__getitem__)
    assert attention._batches(lengths, heads, in_matmuls=False) == [(shortest_first, False)]
    # CPUs: SDPA one example a call, no padding
    assert attention._batches(lengths, heads, True, sdpa_per_example=True)[-2:] == [([2], False), ([7], False)]
    assert attention._batches(lengths, heads, False, sdpa_per_example=True) == [([i], False) for i in shortest_first]


def test_trained_logits_loss_equals_the_full_logits_loss_on_a_packed_row(tiny_base):
    model = load_causal_lm(tiny_base, torch.device("cpu"), torch.float32)
    use_packed_attention(model, torch.device("cpu"), torch.float32)
    rows = _rows(load_tokenizer(tiny_base), PAIRS[:2])
    batch = _packed(rows)
    reference = model(**batch, use_cache=False).loss
    ours, outputs = trained_logits_loss(model, batch)
    assert outputs.logits.shape[1] == sum(sum(1 for x in r.labels if x != IGNORE) for r in rows)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_packed_attention_is_chosen_on_cpu_and_logged(tiny_base, caplog):
    model = load_causal_lm(tiny_base, torch.device("cpu"), torch.float32)
    with caplog.at_level(logging.INFO, logger="finetune.attention"):
        chosen = use_packed_attention(model, torch.device("cpu"), torch.float32)
    assert chosen.startswith(PACKED) and model.config._attn_implementation == PACKED
    assert f"attention: {chosen}" in caplog.text


def test_a_kernel_that_fails_its_check_falls_back_to_the_block_mask(tiny_base, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(attention, "_agrees", broken)
    attention.packed_attention_works.cache_clear()
    model = load_causal_lm(tiny_base, torch.device("cpu"), torch.float32)
    try:
        with caplog.at_level(logging.INFO, logger="finetune.attention"):
            chosen = use_packed_attention(model, torch.device("cpu"), torch.float32)
    finally:
        attention.packed_attention_works.cache_clear()
    assert chosen.startswith(FALLBACK) and model.config._attn_implementation == FALLBACK
    assert "failed its check" in caplog.text and "no kernel here" in caplog.text


def test_packed_attention_leaves_padded_batches_to_sdpa(tiny_base):
    """A padded batch (evaluation, generation) goes through the mask it was given, as with plain SDPA."""
    attention._register()
    model = load_causal_lm(tiny_base, torch.device("cpu"), torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation(PACKED)
        ours = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, reference)


def test_budget_batches_hold_every_example_once_within_the_budget():
    lengths = [30, 50, 20, 200, 10, 60, 40, 90]
    batches = budget_batches(lengths, 100, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= 100
    assert [b for b in batches if sum(lengths[i] for i in b) > 100] == [[3]]  # longer than the budget: alone
    assert budget_batches(lengths, 100, seed=3) == batches


def test_token_budget_sampler_keeps_its_batches_and_reorders_them_per_epoch():
    sampler = TokenBudgetSampler([10] * 40, 30, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert len(sampler) == len(first) == len(second) == 14
    assert sorted(map(sorted, first)) == sorted(map(sorted, second)) and first != second


def test_tokens_per_batch_has_a_floor():
    with pytest.raises(ValidationError, match="tokens_per_batch"):
        TrainingConfig(tokens_per_batch=8)


def test_tokens_per_batch_needs_packing():
    with pytest.raises(ValidationError, match="tokens_per_batch needs packing"):
        TrainingConfig(tokens_per_batch=1024, packing=False)
    assert TrainingConfig(tokens_per_batch=1024).tokens_per_batch == 1024


def test_trainer_rows_follow_the_token_budget(tmp_path, tiny_base):
    from core.config import load_config
    from core.schema.job import JobConfig
    from finetune.job import check
    from finetune.recipe import attach_lora, make_trainer

    cfg = load_config(
        JobConfig,
        None,
        [
            f"model.base={tiny_base}",
            "data.path=builtin:zaragoza-faq",
            "data.max_examples=30",
            "data.max_length=256",
            f"training.output_dir={tmp_path}",
            "training.tokens_per_batch=600",
        ],
    )
    checked = check(cfg)
    device = torch.device("cpu")
    model = attach_lora(load_causal_lm(checked.base, device, torch.float32), cfg)
    trainer = make_trainer(cfg, model, checked.tokenizer, checked.data.train, [], tmp_path, device, torch.float32, [])
    rows = list(trainer.get_train_dataloader())
    lengths = sorted(len(t.input_ids) for t in checked.data.train)
    assert sum(r["input_ids"].shape[1] for r in rows) == sum(lengths)
    assert all(r["input_ids"].shape[0] == 1 and r["input_ids"].shape[1] <= max(600, lengths[-1]) for r in rows)
    assert len(rows) < len(lengths) / 2  # rows of several examples, not batch_size-independent singletons


def test_fused_loss_stays_off_on_cpu(tiny_base):
    model = load_causal_lm(tiny_base, torch.device("cpu"), torch.float32)
    assert not fused_loss_applies(model, torch.device("cpu"))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_varlen_kernel_agrees_with_the_block_mask_on_cuda():
    assert attention._agrees(torch.device("cuda"), torch.bfloat16)
    assert "varlen" in attention.kernel_name(torch.device("cuda"), torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_each_example_in_a_packed_row_has_its_loss_alone_on_cuda(tiny_base):
    attention._register()
    model = load_causal_lm(tiny_base, torch.device("cuda"), torch.bfloat16).eval()
    model.set_attn_implementation(PACKED)
    rows = _rows(load_tokenizer(tiny_base), PAIRS)
    with torch.no_grad():
        alone = [_example_losses(model, [r], _packed([r], "cuda"))[0] for r in rows]
        packed = _example_losses(model, rows, _packed(rows, "cuda"))
        with_boundaries = _example_losses(model, rows, _packed(rows, "cuda", boundaries=True))
    torch.testing.assert_close(torch.stack(packed), torch.stack(alone), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.stack(with_boundaries), torch.stack(alone), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_fused_loss_equals_the_trained_logits_loss_on_cuda(tiny_base):
    pytest.importorskip("liger_kernel")
    model = load_causal_lm(tiny_base, torch.device("cuda"), torch.float32)
    assert fused_loss_applies(model, torch.device("cuda"))
    batch = _packed(_rows(load_tokenizer(tiny_base), PAIRS), "cuda")
    fused, outputs = trained_logits_loss(model, batch)
    assert outputs is None
    reference = model(**batch, use_cache=False).loss
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_uncast_adapter_inputs_under_autocast_give_the_same_loss_and_gradients(tiny_base, dropout):
    """The recipe skips peft's up-cast of each adapter's input under bf16 autocast: same numbers, fewer copies."""
    from core.schema.job import JobConfig
    from finetune.recipe import _adapter_inputs_uncast, attach_lora

    tok = load_tokenizer(tiny_base)
    cfg = JobConfig.model_validate({"model": {"base": str(tiny_base)}, "lora": {"dropout": dropout}})
    model = attach_lora(load_causal_lm(tiny_base, torch.device("cpu"), torch.bfloat16), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters a say in the output
            torch.nn.init.normal_(p, std=0.05)
    batch = _packed(_rows(tok, PAIRS))

    def step(uncast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks both times
        with _adapter_inputs_uncast(model, uncast), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)
    with _adapter_inputs_uncast(model, True):
        assert not any(m.cast_input_dtype_enabled for m in layers)  # the copies are really skipped
    with _adapter_inputs_uncast(model, False):
        assert all(m.cast_input_dtype_enabled for m in layers)  # fp32 training keeps peft's casts
    assert all(m.cast_input_dtype_enabled for m in layers)
    model.train()
    loss_cast, grads_cast = step(False)
    loss_uncast, grads_uncast = step(True)
    assert grads_cast and all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    if dropout == 0.0:
        assert torch.equal(loss_cast, loss_uncast)
        assert all(torch.equal(grads_cast[n], grads_uncast[n]) for n in grads_cast)
    else:  # the dropout's scaling rounds in bf16 instead of fp32: equal up to bf16 precision
        assert torch.allclose(loss_cast, loss_uncast, rtol=1e-2)
        for n in grads_cast:
            assert torch.allclose(grads_cast[n], grads_uncast[n], rtol=0.1, atol=1e-3), n
    # Outside autocast the cast stays on: a bf16 input meets the fp32 adapter in fp32.
    with torch.no_grad():
        assert torch.isfinite(model(**batch, use_cache=False).loss)
