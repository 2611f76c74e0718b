from pydantic import Field

from core.schema.base import Section


class TrackingConfig(Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."
    )
    experiment: str = Field("tuneops", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="Run name; default the job file's name and a timestamp.")


class RegistryConfig(Section):
    model_name: str = Field(
        "faq-assistant", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Registered model name."
    )
    register_version: bool = Field(True, description="Register a model version at the end of a successful run.")
    promote: str = Field("manual", pattern="^(manual|auto)$", description="`auto` promotes when gates pass.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on the registered version.")
