from typing import Literal

from pydantic import Field, field_validator

from core.registry import REF
from core.schema.base import Section


class LoraConfig(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA input (peft's default 0: on a CPU its random masks cost ~20% of a step).",
    )
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="`all-linear` or a list of module names such as [q_proj, v_proj]."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    init_from: str | None = Field(
        None,
        description=(
            "Continue training a registered version's adapter instead of a fresh one: `NAME` (its production "
            "alias), `NAME@ALIAS` or `NAME/VERSION`, resolved in this job's tracking store when the job starts. "
            "The version must be of the same base model, and r, alpha, target_modules and bias must match its "
            "adapter (target_modules compare by the layers they adapt, so `all-linear` equals the list of every "
            "linear layer but the output head)."
        ),
    )

    @field_validator("init_from")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        # The registry's own grammar, so a reference that passes here is one resolve_version can look up.
        if value is not None and not REF.match(value):
            raise ValueError("not a version reference: write NAME, NAME@ALIAS or NAME/VERSION")
        return value
