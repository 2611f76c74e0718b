"""Regional compilation: each decoder layer compiled in place, the packed attention left out of the graph.

Compiling the whole model recompiles whenever a packed row changes length and hits dynamo's limit (run 3 in
docs/benchmarks.md). The decoder layers share one forward, so torch.compile traces it once with dynamic shapes
and every layer reuses the compiled code (their parameters are graph inputs). Inductor then fuses the
elementwise work between the matmuls, forward and backward: RMSNorm's fp32 round trips, the residual adds, the
rotary embeddings, SiLU and the gate product, the casts of the LoRA factors. The packed attention splits the row
at boundaries read from the data, so it stays eager (`finetune.attention` registers it compiler-disabled).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn


def _cpp_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with, or None when it finds none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return str(get_cpp_compiler())
    except Exception:  # inductor raises its own error types when no compiler is found
        return None


def toolchain_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot build kernels for `device` here, or None: checked before a job loads anything,
    since without a toolchain the first training step would fail inside inductor."""
    if device.type == "cpu" and _cpp_compiler() is None:
        return "compiling on CPU needs a C++ compiler (g++ or clang++ on PATH, or CXX); install one or set it false"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "compiling on CUDA needs triton (pip install triton); install it or set it false"
    return None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes its transformers model lists as `_no_split_modules`
    (the blocks never split across devices), found through a peft wrapper; [] when it lists none."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_layers(model: nn.Module) -> int:
    """torch.compile each decoder layer of `model` in place, shapes dynamic; how many. Parameter names, the
    saved adapter and the model's other modules are unchanged; compiling happens on the first steps."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
