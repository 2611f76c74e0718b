"""Gateway settings: a YAML file (`tuneops serve --config`), overridden by `TUNEOPS_SERVE_*` variables.

Unknown keys are errors, so a misspelt limit never silently falls back to its default.
"""

from __future__ import annotations

import contextvars
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from core.errors import ConfigError

_YAML_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("serve_yaml_file", default=None)
SHA256 = re.compile(r"^(sha256:)?[0-9a-f]{64}$")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(
        16,
        ge=1,
        description="Sequences decoded together (bounded concurrency); a request with n choices takes n.",
    )
    max_queue: int = Field(64, ge=0, description="Requests waiting for a batch slot; beyond it, 429 with Retry-After.")
    queue_timeout_s: float = Field(30.0, gt=0, description="Longest wait in the queue before a 503.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body; beyond it, 413.")
    max_tokens: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens when a request sets none (capped by the context window)."
    )
    max_prefill_tokens: int = Field(
        4096,
        ge=1,
        description="Padded prompt tokens one prefill step may process (prompts joining together are padded to "
        "the longest); queued requests beyond it join at later steps, a longer prompt alone. Bounds how long "
        "one step of prompts holds up the running requests.",
    )
    max_n: int = Field(4, ge=1, description="Largest n (choices per prompt).")
    max_stop: int = Field(4, ge=0, description="Most stop strings per request.")
    max_prompts: int = Field(8, ge=1, description="Most prompts in one /v1/completions request.")
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="Context window (prompt + max_tokens); default: the base model's max_position_embeddings.",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with a 429.")


class CaptureSettings(BaseModel):
    """Served traffic as MLflow traces (core/traffic.py): what is kept, where, and how much may wait."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Write one MLflow trace per answered request.")
    experiment: str = Field(
        "traffic/{model}",
        description="Experiment the traces of each served model go to; {model} is the model name.",
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI the traces go to; default: the gateway's tracking_uri."
    )
    sample_rate: float = Field(1.0, ge=0.0, le=1.0, description="Share of requests kept (drawn per request).")
    content: bool = Field(
        True,
        description="Store prompts and answers (e-mails, phone, card and account numbers masked first); "
        "false: only sizes, timings and outcome.",
    )
    buffer_size: int = Field(
        1024,
        ge=1,
        description="Traces waiting to be written; beyond it new ones are dropped and counted in /metrics, so a "
        "slow or unreachable tracking server never holds a request.",
    )
    feedback_wait_s: float = Field(
        10.0,
        ge=0.0,
        description="How long POST /v1/feedback waits for the trace of its completion to be written when it is "
        "still queued.",
    )
    feedback_timeout_s: float = Field(
        30.0,
        gt=0.0,
        description="Longest POST /v1/feedback may take (finding the trace, storing the rating) before it answers "
        "503; bounds the wait on a slow or unreachable tracking server.",
    )

    @field_validator("experiment")
    @classmethod
    def _names_model(cls, template: str) -> str:
        try:
            name = template.format(model="m")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"the only placeholder allowed is {{model}} ({exc})") from None
        if "{model}" not in template or not name.strip():
            raise ValueError("the experiment must name {model}: one experiment per served model")
        return template


class ServeSettings(BaseSettings):
    """Everything `tuneops serve` needs; see configs/serve.yaml."""

    model_config = SettingsConfigDict(env_prefix="TUNEOPS_SERVE_", env_nested_delimiter="__", extra="forbid")

    models: list[str] = Field(
        min_length=1,
        description="Registered model names to serve, each as NAME "
        "(its production alias), NAME@ALIAS and NAME/VERSION.",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking/registry URI; default: MLFLOW_TRACKING_URI, then sqlite:///mlflow.db.",
    )
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32."
    )
    cpu_threads: int = Field(
        1,
        ge=1,
        description="Torch threads on CPU. 1 by default: on a few shared "
        "cores a multi-threaded team stalls on every barrier when another process "
        "holds a core (measured 40x slower decode steps here).",
    )
    pack_weights: bool = Field(
        True,
        description="On CPUs in bf16, multiply by linear weights packed once into oneDNN's blocked layout: decode "
        "steps ~1.2x faster, for a second copy of the linear weights in memory. No effect on CUDA or in fp32.",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="sha256 hex digests of accepted API keys "
        "(optionally prefixed 'sha256:'); empty: no authentication.",
    )
    api_key_labels: dict[str, str] = Field(
        default_factory=dict,
        description="A name per API key, by its sha256 digest, recorded with its requests and feedback; a key "
        "without one is labelled key-<first 8 hex digits of its digest>. The key itself is never recorded.",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="Listen on a non-loopback host with no api_keys (say so only when a proxy in front "
        "authenticates); otherwise such settings are refused.",
    )
    open_metrics: bool = Field(True, description="Serve /metrics without an API key.")
    log_prompts: bool = Field(False, description="Log prompts and completions (off: only sizes are logged).")
    poll_interval_s: float = Field(5.0, gt=0, description="How often the registry is polled for alias moves.")
    warmup_prompt: str = Field("Hello", description="Chat message a new version must answer before it serves.")
    load_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest a version may take to load and answer the warm-up before it counts as failed.",
    )
    retry_max_backoff_s: float = Field(
        300.0,
        gt=0,
        description="Longest wait between tries of a version that failed to load or warm up; the waits start at "
        "poll_interval_s and double. Meanwhile its alias keeps serving the version it had.",
    )
    expose: Literal["aliases", "gated", "any"] = Field(
        "gated",
        description="Which versions clients may name. aliases: only NAME and NAME@ALIAS; gated: also "
        "NAME/VERSION for versions whose evaluation passed or that an alias points at; any: every version.",
    )
    max_loaded_adapters: int = Field(
        8,
        ge=1,
        description="Adapters kept in memory; the least recently used "
        "one not named by a watched alias is unloaded beyond it.",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish before the server exits."
    )
    limits: Limits = Field(default_factory=Limits, description="Admission control.")
    capture: CaptureSettings = Field(
        default_factory=CaptureSettings, description="Traffic capture as MLflow traces, and feedback on it."
    )

    @field_validator("api_keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not SHA256.match(key):
                # `secret` keeps the offending value out of every error message: it may be a real key.
                raise PydanticCustomError(
                    "hashed_key",
                    "api_keys holds sha256 hex digests, never keys: `tuneops serve-key-hash` prints one",
                    {"secret": True},
                )
        return [k.removeprefix("sha256:") for k in keys]

    @field_validator("api_key_labels")
    @classmethod
    def _labelled_digests(cls, labels: dict[str, str]) -> dict[str, str]:
        out = {}
        for digest, label in labels.items():
            if not SHA256.match(digest):
                raise PydanticCustomError(
                    "hashed_key", "api_key_labels is keyed by sha256 hex digests, never keys", {"secret": True}
                )
            if not label.strip():
                raise ValueError("an API-key label must not be empty")
            out[digest.removeprefix("sha256:")] = label
        return out

    @model_validator(mode="after")
    def _authenticated_off_loopback(self) -> ServeSettings:
        if not self.api_keys and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host} is reachable from other machines but api_keys is empty: add keys "
                "(`tuneops serve-key-hash`), listen on 127.0.0.1, or set allow_unauthenticated: true"
            )
        return self

    @model_validator(mode="after")
    def _labels_name_keys(self) -> ServeSettings:
        unknown = set(self.api_key_labels) - set(self.api_keys)
        if unknown:
            raise ValueError(f"api_key_labels names {len(unknown)} digest(s) that are not in api_keys")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: Any,
        file_secret_settings: Any,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _YAML_FILE.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def load_settings(path: Path | None, **overrides: Any) -> ServeSettings:
    """Settings from a YAML file and the environment (environment wins); every problem reported at once."""
    from core.config import format_problems, read_yaml

    lines: dict = {}
    if path is not None:
        _, lines = read_yaml(path)  # also reports missing files and bad YAML with a line number
    token = _YAML_FILE.set(path)
    try:
        return ServeSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(
            format_problems(exc, ServeSettings, lines, set(overrides)), source=str(path) if path else None
        ) from None
    finally:
        _YAML_FILE.reset(token)
