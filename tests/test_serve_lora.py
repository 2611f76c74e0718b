"""The gateway's per-row LoRA (`serve.lora.LoraSet`): a batch mixing versions gives each row its own version's
logits, whichever way the correction is computed and however the layers are grouped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serve.lora import LoraSet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    from core.models import load_causal_lm

    root = tmp_path_factory.mktemp("lora-set")
    for seed, name in enumerate(("a", "b", "c")):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(load_causal_lm(tiny_base, CPU, torch.float32), lora).save_pretrained(root / name)
    return {name: root / name for name in ("a", "b", "c")}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(5, 1000, (6, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def expected(tiny_base: Path, adapters: dict[str, Path], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each version's logits for every row, from peft's own unmerged LoRA."""
    from peft import PeftModel

    from core.models import load_causal_lm

    out = {}
    for name, path in adapters.items():
        model = PeftModel.from_pretrained(load_causal_lm(tiny_base, CPU, torch.float32), path).eval()
        with torch.inference_mode():
            out[name] = model(input_ids=ids).logits
    return out


def loaded(tiny_base: Path, adapters: dict[str, Path], widen: bool) -> LoraSet:
    from core.models import load_causal_lm

    lora = LoraSet(load_causal_lm(tiny_base, CPU, torch.float32).eval(), widen=widen)
    for name, path in adapters.items():
        lora.add(name, path)
    return lora


def mixed_logits(lora: LoraSet, ids: torch.Tensor, rows: list[str]) -> torch.Tensor:
    lora.plan(rows, count=False)
    try:
        with torch.inference_mode():
            return lora.model(input_ids=ids).logits
    finally:
        lora.clear()


def test_layers_that_read_one_input_share_a_group(tiny_base, adapters):
    lora = loaded(tiny_base, adapters, widen=False)
    layer = "model.layers.0"
    assert (f"{layer}.self_attn.q_proj", f"{layer}.self_attn.k_proj", f"{layer}.self_attn.v_proj") in lora.groups
    assert (f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj") in lora.groups
    assert (f"{layer}.self_attn.o_proj",) in lora.groups
    assert sorted(m for g in lora.groups for m in g) == sorted({m for a in lora.adapters.values() for m in a.modules})


@pytest.mark.parametrize("widen", [True, False], ids=["widened", "added"])
def test_every_row_gets_its_own_versions_logits_in_a_mixed_batch(tiny_base, adapters, ids, expected, widen):
    lora = loaded(tiny_base, adapters, widen)
    rows = ["a", "b", "c", "b", "a", "c"]
    for merged in ("a", "b"):
        lora.merge(merged)
        got = mixed_logits(lora, ids, rows)
        for i, name in enumerate(rows):
            torch.testing.assert_close(got[i], expected[name][i], atol=2e-4, rtol=1e-4, msg=f"{merged=} row {i}")
    # Back to one version: the layers run their own forward again, on the merged weights.
    lora.merge("c")
    got = mixed_logits(lora, ids, ["c"] * len(rows))
    torch.testing.assert_close(got, expected["c"], atol=2e-4, rtol=1e-4)
    assert not any("forward" in vars(m) for m in lora.model.modules())


def test_a_wrong_grouping_costs_work_never_correctness(tiny_base, adapters, ids, expected):
    """Each layer's projections grouped by input width alone (gate/up with q/k/v): a member reading another input
    than the group's product was made from computes its own product instead of reusing the wrong one."""
    lora = loaded(tiny_base, adapters, widen=True)
    by_width: dict[tuple[str, int], list[str]] = {}
    for module in sorted(m for g in lora.groups for m in g):
        layer = module.split(".")[2]
        by_width.setdefault((layer, lora._linears[module].in_features), []).append(module)
    assert len(by_width) < len(lora.groups)  # layers reading different inputs now share groups
    lora._groups = [tuple(g) for g in by_width.values()]  # no stacks are built yet: the next plan uses these
    rows = ["b", "a", "a", "c", "b", "c"]
    got = mixed_logits(lora, ids, rows)
    for i, name in enumerate(rows):
        torch.testing.assert_close(got[i], expected[name][i], atol=2e-4, rtol=1e-4)


def test_widened_weights_are_kept_for_at_most_two_version_mixes(tiny_base, adapters, ids):
    lora = loaded(tiny_base, adapters, widen=True)
    for rows in (["a", "b"] * 3, ["a", "c"] * 3, ["b", "c"] * 3, ["a", "b", "c"] * 2):
        mixed_logits(lora, ids, rows)
    assert len(lora._stacks) == 2
