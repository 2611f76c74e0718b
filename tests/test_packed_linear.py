"""Linear layers on packed bf16 weights (`core.packed_linear`): the same products as `F.linear`, never stale."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from core.packed_linear import PackedLinear, pack_linears, packing_applies
from serve.lora import LoraSet

CPU = torch.device("cpu")
BF16 = torch.bfloat16

pytestmark = pytest.mark.skipif(not packing_applies(BF16, CPU), reason="torch here has no oneDNN bf16 linear ops")


def bf16_linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(48, 40, bias=bias).to(BF16)


@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (3, 1, 48), (2, 7, 48)])
def test_a_packed_layer_multiplies_like_the_plain_one(shape):
    plain = bf16_linear()
    packed = PackedLinear.replacing(plain)
    x = torch.randn(shape).to(BF16)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x).float(), plain(x).float(), atol=0.02, rtol=0.01)


def test_a_weight_changed_in_place_is_packed_again():
    plain = bf16_linear()
    packed = PackedLinear.replacing(plain)
    x = torch.randn(4, 48).to(BF16)
    with torch.no_grad():
        before = packed(x)
        plain.weight.mul_(-2.0)  # what a merge does: the shared parameter changes in place
        after = packed(x)
    torch.testing.assert_close(after.float(), F.linear(x, plain.weight, plain.bias).float(), atol=0.04, rtol=0.01)
    assert not torch.allclose(after.float(), before.float(), atol=0.1)


def test_calls_that_need_gradients_take_the_plain_product():
    packed = PackedLinear.replacing(bf16_linear())
    x = torch.randn(4, 48).to(BF16).requires_grad_()
    packed(x).float().sum().backward()
    assert x.grad is not None and packed.weight.grad is not None


def test_only_bf16_cpu_linears_are_replaced_and_they_share_the_parameters():
    model = nn.Sequential(nn.Linear(8, 8).to(BF16), nn.Linear(8, 8), nn.ReLU())
    weight = model[0].weight
    assert pack_linears(model) == 1
    assert type(model[0]) is PackedLinear and model[0].weight is weight
    assert type(model[1]) is nn.Linear
    with torch.inference_mode():  # no version counter: a change could not be seen
        made_in_inference = nn.Sequential(nn.Linear(8, 8).to(BF16))
    assert pack_linears(made_in_inference) == 0


def logits(lora: LoraSet, ids: torch.Tensor, rows: list[str]) -> torch.Tensor:
    lora.plan(rows, count=False)
    try:
        with torch.inference_mode():
            return lora.model(input_ids=ids).logits.float()
    finally:
        lora.clear()


@pytest.mark.parametrize("widen", [True, False], ids=["widened", "added"])
def test_mixed_batches_on_packed_weights_match_plain_weights(tiny_base: Path, tmp_path: Path, widen: bool):
    from peft import LoraConfig, get_peft_model

    from core.models import load_causal_lm

    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(load_causal_lm(tiny_base, CPU, torch.float32), lora).save_pretrained(tmp_path / name)
    sets = []
    for packed in (False, True):
        model = load_causal_lm(tiny_base, CPU, BF16).eval()
        if packed:
            assert pack_linears(model) == 15  # 2 layers x 7 projections, and the tied output head
        lora = LoraSet(model, widen=widen)
        for name in ("a", "b"):
            lora.add(name, tmp_path / name)
        sets.append(lora)
    plain, packed = sets
    ids = torch.randint(5, 1000, (4, 6), generator=torch.Generator().manual_seed(0))
    for rows in (["a"] * 4, ["a", "b", "b", "a"]):
        torch.testing.assert_close(logits(packed, ids, rows), logits(plain, ids, rows), atol=0.03, rtol=0.02)
    # Merging the other version rewrites the weights in place: the packed layers follow.
    for lora in sets:
        lora.merge("b")
    for rows in (["b"] * 4, ["b", "a", "a", "b"]):
        torch.testing.assert_close(logits(packed, ids, rows), logits(plain, ids, rows), atol=0.03, rtol=0.02)
    if widen:
        assert all(group.packed for group in packed._stacks[(("a",), "b")].values())
