"""The fine-tune job file: one schema, sections by concern."""

from pydantic import Field

from core.schema.base import Section
from core.schema.data import DataConfig
from core.schema.evaluation import EvaluationConfig
from core.schema.lora import LoraConfig
from core.schema.model import ModelConfig
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
