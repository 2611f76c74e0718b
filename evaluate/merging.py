"""Each subject's adapter merged into the shared base weights while it is measured, restored exactly after.

Unmerged, peft runs two small matmuls and an add per adapted layer on every token: on a CPU in bf16 the default
job's version answered and scored 1.4x slower than its base model. Merged, a version costs what its base
costs, and the gateway serves its production version merged too, so the numbers describe what users get.
Every merge starts from a pristine copy of the adapted weights (merging and unmerging in bf16 would round the
base a little further each time), and the base subject gets those pristine weights back bit for bit. The copy
costs one more set of the adapted weights in memory, so merging is used on CPUs only, where memory is
plentiful and every pass over the weights shows; on CUDA the adapters run unmerged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from core.packed_linear import PackedLinear

log = logging.getLogger(__name__)


class MergedAdapters:
    """The adapters of one peft model, merged one at a time into its base layers (`use`)."""

    def __init__(self, model: Any) -> None:
        from peft.tuners.lora import Linear as LoraLinear

        self.layers: dict[str, Any] = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
        self.pristine = {n: m.get_base_layer().weight.detach().clone() for n, m in self.layers.items()}
        self.current: str | None = None

    @staticmethod
    def applies(model: Any) -> bool:
        """Plain LoRA on linear layers of a CPU model, no extra trained modules: merging changes nothing else."""
        from peft.tuners.lora import Linear as LoraLinear

        configs = getattr(model, "peft_config", None)
        if not configs or next(model.parameters()).device.type != "cpu":
            return False
        for config in configs.values():
            if getattr(config, "peft_type", None) != "LORA" or config.modules_to_save or config.use_dora:
                return False
            if getattr(config, "lora_bias", False) or getattr(config, "trainable_token_indices", None):
                return False
        layers: list[Any] = [m for m in model.modules() if isinstance(m, LoraLinear)]
        plain = (nn.Linear, PackedLinear)  # not quantized linears, which subclass nn.Linear
        return bool(layers) and all(type(m.get_base_layer()) in plain and not m.merged for m in layers)

    @torch.no_grad()
    def use(self, adapter: str | None) -> None:
        """Make the base layers hold `adapter` merged (None: the pristine base); a no-op when they already do."""
        if adapter == self.current:
            return
        for name, layer in self.layers.items():
            weight = layer.get_base_layer().weight
            if adapter is not None and adapter in layer.lora_A:
                weight.copy_(self.pristine[name].float() + layer.get_delta_weight(adapter).float())
            else:
                weight.copy_(self.pristine[name])
        log.debug("evaluation weights: %s", adapter or "the base model")
        self.current = adapter
