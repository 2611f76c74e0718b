"""`finetune.lora_linear`: LoRA layers with the adds inside the matmuls give peft's outputs and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.lora_linear import fuse_lora_layers

CPU = torch.device("cpu")


def peft_model(tiny_base: Path, dtype: torch.dtype = torch.float32, **lora: object):
    from peft import LoraConfig, get_peft_model

    from core.models import load_causal_lm

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora)
    return get_peft_model(load_causal_lm(tiny_base, CPU, dtype), config, autocast_adapter_dtype=True)


def loss_and_grads(model, ids: torch.Tensor, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(1))


def test_every_plain_lora_layer_is_fused(tiny_base):
    assert fuse_lora_layers(peft_model(tiny_base)) == 14  # 2 layers x 7 projections


def test_fused_layers_give_peft_loss_and_gradients_in_fp32(tiny_base, ids):
    reference, fused = peft_model(tiny_base), peft_model(tiny_base)
    fuse_lora_layers(fused)
    want_loss, want = loss_and_grads(reference, ids)
    got_loss, got = loss_and_grads(fused, ids)
    torch.testing.assert_close(got_loss, want_loss)
    assert got.keys() == want.keys() and any("lora_A" in n for n in got) and any("lora_B" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_fused_layers_follow_peft_under_bf16_autocast(tiny_base, ids):
    """bf16 base, fp32 adapters, the Trainer's autocast (the recipe's CPU setting): the fused gradients are as
    close to the fp32 ones as peft's own bf16 gradients are (both round differently, ~2-5% here)."""
    _, exact = loss_and_grads(peft_model(tiny_base), ids)
    reference, fused = peft_model(tiny_base, torch.bfloat16), peft_model(tiny_base, torch.bfloat16)
    fuse_lora_layers(fused)
    want_loss, want = loss_and_grads(reference, ids, autocast=True)
    got_loss, got = loss_and_grads(fused, ids, autocast=True)
    torch.testing.assert_close(got_loss, want_loss, atol=0.02, rtol=0.01)
    assert got.keys() == want.keys() == exact.keys()
    for name in want:
        assert got[name].dtype == torch.float32, name  # the fp32 master weights get fp32 gradients
        norm = exact[name].norm()
        theirs, ours = (want[name] - exact[name]).norm() / norm, (got[name] - exact[name]).norm() / norm
        assert ours <= 2 * theirs + 0.01, f"{name}: {ours:.4f} from fp32 against peft's {theirs:.4f}"


def test_merged_or_disabled_adapters_take_peft_forward(tiny_base, ids):
    model = peft_model(tiny_base)
    fuse_lora_layers(model)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            bare = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    assert not torch.allclose(adapted, bare, atol=1e-3)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_layers_with_dropout_are_left_to_peft(tiny_base):
    assert fuse_lora_layers(peft_model(tiny_base, lora_dropout=0.1)) == 0


def test_a_trained_base_bias_still_gets_its_gradient(tiny_base, ids):
    """lora.bias all makes base biases trainable; the fused product has no bias gradient, so peft's runs."""
    from torch import nn

    model = peft_model(tiny_base, bias="all")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.base_layer.bias = nn.Parameter(torch.zeros(layer.base_layer.out_features))
    fuse_lora_layers(model)
    model(input_ids=ids, labels=ids).loss.backward()
    assert layer.base_layer.bias.grad is not None and layer.base_layer.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_fused_layers_give_peft_gradients_under_activation_checkpointing(tiny_base, ids, reentrant):
    """training.gradient_checkpointing recomputes each layer's forward in backward, through LoraMatmul too."""
    models = []
    for fused in (False, True):
        model = peft_model(tiny_base)
        model.base_model.model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.enable_input_require_grads()
        model.train()
        if fused:
            fuse_lora_layers(model)
        models.append(model)
    (want_loss, want), (got_loss, got) = (loss_and_grads(m, ids) for m in models)
    torch.testing.assert_close(got_loss, want_loss)
    assert got.keys() == want.keys() and len(got) == 28
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_frozen_factors_get_no_gradient_and_the_others_peft_ones(tiny_base, ids):
    models = []
    for fused in (False, True):
        model = peft_model(tiny_base)
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
        if fused:
            fuse_lora_layers(model)
        models.append(model)
    (_, want), (_, got) = (loss_and_grads(m, ids) for m in models)
    assert got.keys() == want.keys() and all("lora_B" in n for n in got) and len(got) == 14
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)
