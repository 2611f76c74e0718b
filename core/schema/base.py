from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Every config section forbids unknown keys so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
