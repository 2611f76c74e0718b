"""The fine-tune job file: one schema, sections by concern."""

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from core.schema.base import Section
from core.schema.data import DataConfig
from core.schema.evaluation import EvaluationConfig
from core.schema.lora import LoraConfig
from core.schema.model import ModelConfig
from core.schema.monitoring import MonitoringConfig
from core.schema.sweep import SweepConfig
from core.schema.tracking import RegistryConfig, TrackingConfig
from core.schema.training import TrainingConfig


class JobConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model and how to load it.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data and how to render it.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter shape.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="The training recipe.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="Model registry.")
    evaluation: EvaluationConfig | None = Field(
        None, description="Evaluation and gates; when present they run after training."
    )
    monitoring: MonitoringConfig | None = Field(
        None,
        description="Checks `tuneops monitor` runs on the served versions' traffic (drift, bias, service, feedback).",
    )
    sweep: SweepConfig | None = Field(
        None, description="Hyperparameter search (`tuneops sweep`): keys to vary, objective, trials, pruner, storage."
    )

    @model_validator(mode="after")
    def _sweep_needs_held_out_data(self) -> "JobConfig":
        if self.sweep is None or self.data.validation_split > 0 or self.data.validation_path is not None:
            return self
        problem = PydanticCustomError(
            "sweep_validation",
            "a sweep measures {objective} on held-out data: set this above 0, or set data.validation_path",
            {"objective": self.sweep.objective},
        )
        where = InitErrorDetails(type=problem, loc=("data", "validation_split"), input=self.data.validation_split)
        raise ValidationError.from_exception_data(type(self).__name__, [where])
