"""`evaluate.merging`: a subject measured with its adapter merged gives its unmerged numbers, and the base
weights come back bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.packed_linear import pack_linears, packing_applies
from evaluate.merging import MergedAdapters
from evaluate.scoring import Subject

CPU = torch.device("cpu")


def two_adapter_model(tiny_base: Path, dtype: torch.dtype = torch.float32, **extra: object):
    from peft import LoraConfig, get_peft_model

    from core.models import load_causal_lm

    def config(seed: int) -> LoraConfig:
        torch.manual_seed(seed)
        return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **extra)

    model = get_peft_model(load_causal_lm(tiny_base, CPU, dtype), config(0), adapter_name="model")
    model.add_adapter("production", config(1))
    return model.eval()


def subject(model, adapter: str | None, merged: MergedAdapters | None) -> Subject:
    return Subject(adapter or "base", model, adapter, None, None, None, [0], merged=merged)  # type: ignore[arg-type]


def logits(s: Subject, ids: torch.Tensor) -> torch.Tensor:
    with s.active() as model:
        return model(input_ids=ids).logits.clone()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(5, 1000, (2, 8), generator=torch.Generator().manual_seed(0))


def test_merged_subjects_give_the_unmerged_logits_and_leave_the_base_exact(tiny_base, ids):
    model = two_adapter_model(tiny_base)
    assert MergedAdapters.applies(model)
    pristine = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    merged = MergedAdapters(model)
    order = ["model", None, "production", "model", None]
    want = {a: logits(subject(model, a, None), ids) for a in set(order)}
    for adapter in order:
        torch.testing.assert_close(logits(subject(model, adapter, merged), ids), want[adapter], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want["model"], want[None], atol=1e-3)  # the adapters change the answers
    for name, param in model.named_parameters():
        if name in pristine:
            assert torch.equal(param, pristine[name]), name


def test_the_base_weights_come_back_when_a_measurement_fails(tiny_base, ids):
    model = two_adapter_model(tiny_base)
    layer = model.base_model.model.model.layers[0].mlp.up_proj.get_base_layer()
    before = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="scoring failed"), subject(model, "model", MergedAdapters(model)).active():
        assert not torch.equal(layer.weight, before)  # merged while it runs
        raise RuntimeError("scoring failed")
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("extra", [{"use_dora": True}, {"modules_to_save": ["lm_head"]}], ids=["dora", "modules"])
def test_adapters_that_are_more_than_plain_lora_run_unmerged(tiny_base, extra):
    assert not MergedAdapters.applies(two_adapter_model(tiny_base, **extra))


@pytest.mark.skipif(not packing_applies(torch.bfloat16, CPU), reason="torch here has no oneDNN bf16 linear ops")
def test_merged_subjects_on_packed_bf16_weights_follow_every_merge(tiny_base, ids):
    """Evaluation in bf16 packs the linear layers too: each merge changes the weights in place, and the packed
    copies must follow, or a subject would be measured with the previous one's weights."""
    plain, packed = two_adapter_model(tiny_base, torch.bfloat16), two_adapter_model(tiny_base, torch.bfloat16)
    assert pack_linears(packed) > 0 and MergedAdapters.applies(packed)
    merged = MergedAdapters(packed)
    for adapter in ["model", None, "production", None]:
        want = logits(subject(plain, adapter, None), ids).float()
        got = logits(subject(packed, adapter, merged), ids).float()
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.02, msg=str(adapter))
