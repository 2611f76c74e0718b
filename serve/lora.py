"""LoRA versions on one base model: the busiest version merged into the weights, the others applied per row.

One version usually takes most of the traffic. Its adapter is merged into the base weights, so its tokens cost
what the bare base costs (peft's unmerged LoRA adds two small matmuls and Python dispatch to every linear layer
of every step). Rows of other versions in the same batch get a low-rank correction on their rows only:
`(B_v A_v - B_m A_m) x`, the version's own delta minus the merged one's, over stacked factors: one product
`x A^T` per input that several layers read (q/k/v, gate/up), then `B` per layer, on CPUs inside the layer's own
matmul (`[x, xA^T] @ [W | B]^T`), where a separate small product costs more in memory waits than in arithmetic.
Which version is merged follows the traffic: after `switch_after` steps in a row with only another version's
rows, that version is merged instead (from a pristine copy of the base weights, so switching never drifts).

peft reads the adapter files (`load_peft_weights`, `LoraConfig`) and names the pattern rules; only plain LoRA
on linear layers is served (what tuneops trains). Anything else is refused on loading, naming what it uses.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from core.errors import ModelError
from core.packed_linear import PackedLinear, multiply, pack

PREFIX = "base_model.model."

log = logging.getLogger(__name__)


@dataclass
class ModuleDelta:
    """One linear layer's adapter: `scale * B @ A` (A `[r, in]`, B `[out, r]`) and an optional new bias."""

    a: torch.Tensor
    b: torch.Tensor  # already multiplied by the scale
    bias: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        return self.b.float() @ self.a.float()


@dataclass
class Adapter:
    name: str
    modules: dict[str, ModuleDelta]


def _refuse_features(config: dict[str, Any], path: Path) -> None:
    checks = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "trainable_token_indices": bool(config.get("trainable_token_indices")),
        "target_parameters": bool(config.get("target_parameters")),
        "layer_replication": bool(config.get("layer_replication")),
        "lora_bias": bool(config.get("lora_bias")),
    }
    used = [name for name, bad in checks.items() if bad]
    if used:
        raise ModelError(
            f"the adapter in {path} uses {', '.join(used)}: the gateway serves plain LoRA on linear layers"
        )


def load_adapter(name: str, path: Path, model: nn.Module) -> Adapter:
    """Read an adapter folder saved by peft into per-module deltas on `model`'s device and dtype."""
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    config_file = path / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {config_file}: {exc}") from exc
    _refuse_features(config, path)
    weights = load_peft_weights(str(path), device="cpu")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    param = next(model.parameters())
    alpha_default = float(config.get("lora_alpha", 8))
    alphas: dict[str, float] = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        if not key.startswith(PREFIX):
            raise ModelError(f"the adapter in {path} holds an unexpected weight {key!r}")
        short = key[len(PREFIX) :]
        for suffix in (".lora_A.weight", ".lora_B.weight", ".bias"):
            if short.endswith(suffix):
                parts.setdefault(short[: -len(suffix)], {})[suffix] = tensor
                break
        else:
            raise ModelError(f"the adapter in {path} holds {key!r}: the gateway serves plain LoRA on linear layers")
    modules: dict[str, ModuleDelta] = {}
    for module, found in parts.items():
        linear = linears.get(module)
        if linear is None:
            raise ModelError(f"the adapter in {path} targets {module!r}, which is not a linear layer of the base")
        a, b, bias = found.get(".lora_A.weight"), found.get(".lora_B.weight"), found.get(".bias")
        if (a is None) != (b is None):
            raise ModelError(f"the adapter in {path} has only one of lora_A and lora_B for {module!r}")
        if a is not None and b is not None:
            r = a.shape[0]
            if a.shape != (r, linear.in_features) or b.shape != (linear.out_features, r):
                raise ModelError(f"the adapter in {path} has weights of the wrong shape for {module!r}")
            alpha = float(alphas.get(get_pattern_key(list(alphas), module), alpha_default))
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            a = a.to(param.device, param.dtype)
            b = (b.float() * scale).to(param.device, param.dtype)
        else:  # a trained bias only (bias="all"/"lora_only"): a rank-0 delta
            a = torch.zeros(0, linear.in_features, device=param.device, dtype=param.dtype)
            b = torch.zeros(linear.out_features, 0, device=param.device, dtype=param.dtype)
        if bias is not None:
            bias = bias.to(param.device, param.dtype)
        modules[module] = ModuleDelta(a, b, bias)
    if not modules:
        raise ModelError(f"the adapter in {path} holds no LoRA weights")
    return Adapter(name, modules)


@dataclass
class _Correction:
    """Stacked factors giving `(version - merged)` on one module: `x @ a.T @ b.T (+ bias)`."""

    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class _Group:
    """The corrections of the modules that read one input (q/k/v, gate/up), every corrected version stacked.

    One product `x @ at` gives every member's low-rank columns at once; a row keeps only its own version's
    columns (a 0/1 mask by `cols`), so one product serves every version in the batch without gathering rows.
    Member `m` owns columns `spans[m]` and turns them into its output with `bt[m]`, or, widened, in the same
    matmul as its weights: `[x, low_m] @ wide[m].T` with `wide[m] = [W_m | B_m]`.
    """

    at: torch.Tensor  # [in, R], contiguous
    cols: torch.Tensor  # [R]: the corrected version each column belongs to
    spans: dict[str, tuple[int, int]]
    bt: dict[str, torch.Tensor]  # [R_m, out]
    bias: dict[str, torch.Tensor]  # `[versions, out]`, only for members where some version changes the bias
    wide: dict[str, torch.Tensor] = field(default_factory=dict)  # [out, in + R_m], when widened
    packed: bool = False  # `wide` holds packed weights (`core.packed_linear`), as the layers themselves do
    at_packed: torch.Tensor | None = None  # `at` packed, when `packed`: the product for a few decode rows


class LoraSet:
    """The adapters loaded on one base model, one of them merged, the others corrected per row.

    Call `plan(adapters)` with one adapter name per batch row before a forward pass; it returns after choosing
    the merge, and the adapted layers add each row's correction during that pass.

    `widen` (default: on CPUs) computes each layer's correction inside its own matmul, on a copy of its weights
    widened by the correction's columns. On CPUs a separate small product and add per layer cost ~150 us, most
    of it waiting on memory, against ~40 us widened; the price is one copy of the adapted weights while two
    versions share batches (at most two such copies are kept, for the last two version mixes).
    """

    def __init__(self, model: nn.Module, switch_after: int = 32, widen: bool | None = None) -> None:
        self.model = model
        self.switch_after = switch_after
        self.adapters: dict[str, Adapter] = {}
        self.merged: str | None = None
        self._linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self._pristine: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._corrections: dict[tuple[str, str | None], dict[str, _Correction]] = {}
        self._stacks: OrderedDict[tuple[tuple[str, ...], str | None], dict[str, _Group]] = OrderedDict()
        self._step: dict[str, _Group] = {}  # this forward pass's corrections by module; empty: none
        self._masks: dict[int, torch.Tensor] = {}  # this pass's row/column masks by group id
        self._lows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # group id -> (input, masked product)
        self._onehot: torch.Tensor | None = None  # `[rows, versions]`: which corrected version each row is
        # The last mixed plan's row versions, groups, one-hot and masks: reused while the rows stay the same.
        self._last_plan: tuple[tuple[str, ...], dict[str, _Group], torch.Tensor, dict[int, torch.Tensor]] | None = None
        self.widen = next(model.parameters()).device.type == "cpu" if widen is None else widen
        self._groups: list[tuple[str, ...]] = []  # adapted modules by shared input, found by tracing the base
        # Versions with non-finite weights are corrected on their own rows only (gathered, then added back):
        # in the stacked product a NaN factor would reach every row (0 * NaN is NaN).
        self._isolated: list[tuple[torch.Tensor, dict[str, _Correction]]] = []
        self._targets: set[str] = set()  # modules some adapter changes
        self._installed: set[str] = set()  # layers running the correcting forward: only while a step needs it
        self._streak: tuple[str | None, int] = (None, 0)
        self.unmergeable: set[str] = set()
        self.merge_switches = 0

    @property
    def groups(self) -> list[tuple[str, ...]]:
        """The adapted layers grouped by the input they read (q/k/v, gate/up): one low-rank product each."""
        return list(self._groups)

    # loading --------------------------------------------------------------------------------------

    def add(self, name: str, path: Path) -> None:
        adapter = load_adapter(name, path, self.model)
        for module in adapter.modules:
            if module not in self._targets:
                linear = self._linears[module]
                weight = linear.weight.detach()
                bias = linear.bias.detach() if linear.bias is not None else None
                # Kept on the CPU: merging recomputes from it, so a GPU holds one copy of the weights.
                self._pristine[module] = (
                    weight.to("cpu", copy=True),
                    None if bias is None else bias.to("cpu", copy=True),
                )
                self._targets.add(module)
        if self._targets - {m for members in self._groups for m in members}:
            self._groups = self._trace_groups()
        self.adapters[name] = adapter
        finite = all(
            bool(torch.isfinite(t).all()) for d in adapter.modules.values() for t in (d.a, d.b, d.bias) if t is not None
        )
        if not finite:  # merged, it would break every version's rows; corrected, only its own
            self.unmergeable.add(name)
        self._corrections.clear()
        self._drop_stacks()
        if self.merged is None and finite:
            self.merge(name)

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self.unmergeable.discard(name)
        self._corrections.clear()
        self._drop_stacks()
        if self.merged == name:
            self.merge(next((a for a in self.adapters if a not in self.unmergeable), None))

    # merging --------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, name: str | None) -> None:
        """Make `name` the merged version (None: the bare base) from the pristine weights."""
        adapter = self.adapters.get(name) if name is not None else None
        for module, (weight, bias) in self._pristine.items():
            linear = self._linears[module]
            delta = adapter.modules.get(module) if adapter is not None else None
            w = weight.to(linear.weight.device, torch.float32)
            if delta is not None and delta.a.shape[0]:
                w = w + delta.dense()
            linear.weight.copy_(w)
            if bias is not None and linear.bias is not None:
                linear.bias.copy_(delta.bias if delta is not None and delta.bias is not None else bias)
        if name != self.merged:
            log.info("merged into the weights: %s (was %s)", name, self.merged)
        self.merged = name
        self._corrections.clear()
        self._drop_stacks()
        self.merge_switches += 1

    # per-step plan --------------------------------------------------------------------------------

    def plan(self, adapters: list[str], count: bool = True) -> None:
        """Set the rows of each version for the next forward pass; merge a version that keeps the batch alone.

        `count=False` (a warm-up probe) leaves the traffic count, so it never moves the merge.
        """
        names = set(adapters)
        if count and len(names) == 1:
            (only,) = names
            streak_name, steps = self._streak
            steps = steps + 1 if streak_name == only else 1
            self._streak = (only, steps)
            if only != self.merged and only not in self.unmergeable and (steps >= self.switch_after or not self.merged):
                self.merge(only)
        elif count:
            self._streak = (None, 0)
        self.clear()
        if names == {self.merged}:
            self._uninstall()
            return
        self._install()
        param = next(self.model.parameters())
        for name in sorted(names & self.unmergeable):
            rows = torch.tensor([i for i, a in enumerate(adapters) if a == name], device=param.device)
            self._isolated.append((rows, self._correction(name)))
        corrected = tuple(sorted(names - {self.merged} - self.unmergeable))
        if not corrected:
            return
        self._step = self._stacked(corrected)
        versions = tuple(adapters)
        memo = self._last_plan
        if memo is not None and memo[0] == versions and memo[1] is self._step:  # decode steps repeat the last plan
            self._onehot, self._masks = memo[2], memo[3]
            return
        index = {name: i for i, name in enumerate(corrected)}
        which = torch.tensor([index.get(a, -1) for a in adapters], device=param.device)
        self._onehot = (which[:, None] == torch.arange(len(corrected), device=param.device)).to(param.dtype)
        for group in self._step.values():
            if id(group) not in self._masks:
                self._masks[id(group)] = (which[:, None] == group.cols[None, :]).to(param.dtype)
        self._last_plan = (versions, self._step, self._onehot, self._masks)

    def clear(self) -> None:
        self._isolated = []
        self._step = {}
        self._masks = {}
        self._lows = {}
        self._onehot = None

    def _drop_stacks(self) -> None:
        self._stacks.clear()
        self._last_plan = None  # it holds a stack too

    def _stacked(self, corrected: tuple[str, ...]) -> dict[str, _Group]:
        key = (corrected, self.merged)
        if key not in self._stacks:
            per_version = [self._correction(name) for name in corrected]
            modules = set().union(*per_version)
            out: dict[str, _Group] = {}
            for members in self._groups:
                present = [m for m in members if m in modules]
                if present:
                    group = self._group(present, per_version)
                    out.update(dict.fromkeys(present, group))
            self._stacks[key] = out
            while len(self._stacks) > (2 if self.widen else 16):  # widened groups hold a copy of the weights
                self._stacks.popitem(last=False)  # the plan memo, if it holds this stack, is replaced by the caller
        self._stacks.move_to_end(key)
        return self._stacks[key]

    def _group(self, members: list[str], per_version: list[dict[str, _Correction]]) -> _Group:
        a_parts: list[torch.Tensor] = []
        cols: list[int] = []
        spans: dict[str, tuple[int, int]] = {}
        bt: dict[str, torch.Tensor] = {}
        bias: dict[str, torch.Tensor] = {}
        for module in members:
            fixes = [c.get(module) for c in per_version]
            start = len(cols)
            b_parts = []
            for v, fix in enumerate(fixes):
                if fix is not None and fix.a.shape[0]:
                    a_parts.append(fix.a)
                    b_parts.append(fix.b)
                    cols += [v] * fix.a.shape[0]
            spans[module] = (start, len(cols))
            if b_parts:
                bt[module] = torch.cat(b_parts, 1).T.contiguous()
            if any(f is not None and f.bias is not None for f in fixes):
                some = next(f for f in fixes if f is not None)
                zero = some.b.new_zeros(some.b.shape[0])
                bias[module] = torch.stack([f.bias if f is not None and f.bias is not None else zero for f in fixes])
        weight = self._linears[members[0]].weight
        at = torch.cat(a_parts, 0).T.contiguous() if a_parts else weight.new_zeros(weight.shape[1], 0)
        group = _Group(at, torch.tensor(cols, device=weight.device, dtype=torch.long), spans, bt, bias)
        if self.widen:
            group.packed = all(isinstance(self._linears[m], PackedLinear) for m in bt)
            if group.packed and at.shape[1]:
                group.at_packed = pack(at.T)
            for module, factor in bt.items():
                wide = torch.cat([self._linears[module].weight.detach(), factor.T], 1)
                group.wide[module] = pack(wide) if group.packed else wide
        return group

    @torch.no_grad()
    def _trace_groups(self) -> list[tuple[str, ...]]:
        """The adapted modules grouped by the input they read, from one short pass of the base.

        A module that turns out to read another input than its group's at serving time still gets its own
        product (`_low` compares the input itself), so a wrong grouping costs work, never correctness.
        """
        seen: list[tuple[torch.Tensor, list[str]]] = []

        def record(name: str) -> Any:
            def pre_hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
                for tensor, names in seen:
                    if tensor is args[0]:
                        names.append(name)
                        return
                seen.append((args[0], [name]))

            return pre_hook

        handles = [self._linears[m].register_forward_pre_hook(record(m)) for m in sorted(self._targets)]
        device = next(self.model.parameters()).device
        try:
            self.model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
        except Exception as exc:  # a model that cannot run a plain pass: every module on its own product
            log.warning("cannot trace which adapted layers share an input (%s); correcting each alone", exc)
            seen = [(torch.empty(0), [m]) for m in sorted(self._targets)]
        finally:
            for handle in handles:
                handle.remove()
        traced = [m for _, names in seen for m in names]
        groups = [tuple(names) for _, names in seen]
        return groups + [(m,) for m in sorted(self._targets - set(traced))]

    def _low(self, group: _Group, x: torch.Tensor) -> torch.Tensor:
        """The group's masked low-rank product for input `x`, `[tokens, R]`; computed once per input."""
        hit = self._lows.get(id(group))
        if hit is not None and hit[0] is x:
            return hit[1]
        flat = x.reshape(-1, x.shape[-1])
        low = multiply(flat, group.at_packed, None) if group.at_packed is not None else flat @ group.at
        mask = self._masks[id(group)]
        low.view(x.shape[0], -1, low.shape[-1]).mul_(mask.unsqueeze(1))
        self._lows[id(group)] = (x, low)
        return low

    def _install(self) -> None:
        for module in self._targets - self._installed:
            linear = self._linears[module]
            linear.forward = self._correcting_forward(module, linear)  # type: ignore[method-assign]
            self._installed.add(module)

    def _uninstall(self) -> None:
        for module in self._installed:
            del self._linears[module].forward
        self._installed.clear()

    def _correction(self, name: str) -> dict[str, _Correction]:
        key = (name, self.merged)
        if key not in self._corrections:
            own = self.adapters[name].modules
            merged = self.adapters[self.merged].modules if self.merged in self.adapters else {}
            out: dict[str, _Correction] = {}
            for module in set(own) | set(merged):
                mine, theirs = own.get(module), merged.get(module)
                a_parts = [d.a for d in (mine, theirs) if d is not None]
                b_parts = [d.b if d is mine else -d.b for d in (mine, theirs) if d is not None]
                bias = None
                pristine_bias = self._pristine[module][1]
                if pristine_bias is not None:
                    base_bias = pristine_bias.to(a_parts[0].device, a_parts[0].dtype)
                    new = mine.bias if mine is not None and mine.bias is not None else base_bias
                    old = theirs.bias if theirs is not None and theirs.bias is not None else base_bias
                    bias = None if torch.equal(new, old) else new - old
                out[module] = _Correction(torch.cat(a_parts, 0), torch.cat(b_parts, 1), bias)
            self._corrections[key] = out
        return self._corrections[key]

    def _correcting_forward(self, module: str, linear: nn.Linear) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            group = self._step.get(module)
            first, last = group.spans[module] if group is not None else (0, 0)
            wide = group.wide.get(module) if group is not None else None
            if group is not None and wide is not None:
                flat_x = x.reshape(-1, x.shape[-1])
                low = self._low(group, x)[:, first:last]
                widened = torch.cat([flat_x, low], -1)
                output = multiply(widened, wide, linear.bias) if group.packed else F.linear(widened, wide, linear.bias)
                output = output.view(*x.shape[:-1], -1)
            else:
                output = type(linear).forward(linear, x)  # the layer's own product (packed or plain), unshadowed
                if group is not None and last > first:
                    flat = output.view(-1, output.shape[-1])  # the linear's output is contiguous
                    flat.addmm_(self._low(group, x)[:, first:last], group.bt[module])
            for picked, corrections in self._isolated:
                fix = corrections.get(module)
                if fix is not None and fix.a.shape[0]:
                    delta = (x.index_select(0, picked) @ fix.a.T) @ fix.b.T
                    output = output.index_add(0, picked, delta.to(output.dtype))
            bias = group.bias.get(module) if group is not None else None
            if bias is not None and self._onehot is not None:
                rows, out_features = output.shape[0], output.shape[-1]
                shift = self._onehot @ bias  # [rows, out]
                output += shift if output.dim() == 2 else shift.view(rows, *([1] * (output.dim() - 2)), out_features)
            return output

        return forward
