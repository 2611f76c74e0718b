from typing import Literal

from pydantic import Field

from core.schema.base import Section


class ModelConfig(Section):
    base: str = Field(
        "smollm2-135m-instruct",
        description="Base model: a catalogue name (`tuneops models`), a local Hugging Face folder, or a hub id.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    trust_remote_code: bool = Field(False, description="Allow code shipped with the model to run. Off by default.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run: CUDA when present, else CPU.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute dtype: bf16 where the hardware runs it fast (AMX CPUs, CUDA), else fp32."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the frozen base in 4 or 8 bits (QLoRA); needs CUDA and bitsandbytes."
    )
