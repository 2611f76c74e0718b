from typing import Literal

from pydantic import Field

from core.schema.base import Section


class LoraConfig(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="`all-linear` or a list of module names such as [q_proj, v_proj]."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
