"""Device and dtype are chosen once, here: CUDA when present, else CPU; bf16 where the hardware runs it fast."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import torch

DevicePref = Literal["auto", "cpu", "cuda"]
DtypePref = Literal["auto", "bf16", "fp16", "fp32"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX or AVX512-BF16, where bf16 matmuls beat fp32 by several times."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_device(pref: DevicePref = "auto") -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def choose_dtype(pref: DtypePref, device: torch.device) -> torch.dtype:
    if pref != "auto":
        return _DTYPES[pref]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]
