"""The `sweep` section: which job keys a hyperparameter search varies, how, and what it optimises.

Each searched key is a dotted key of the job (`training.learning_rate`) with a distribution written as text:
`log_uniform(a, b)`, `uniform(a, b)`, `int(a, b)` or `choice([v1, v2, ...])`. A distribution is checked
against the type and range of the key it varies, so a search that could draw an invalid job fails here, with
the line of the entry, before anything trains.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from core.schema.base import Section

# Searchable: the adapter's shape and the training recipe. Data, model, tracking and registry keys would
# change what trials are compared on or where they are recorded; these training keys are bookkeeping.
SEARCHABLE_SECTIONS = ("lora", "training")
NOT_SEARCHABLE = {"training.output_dir", "training.eval_steps", "training.save_steps", "training.save_total_limit"}
NOT_SEARCHABLE |= {"training.logging_steps"}

# eval_loss is the Trainer's validation loss; the others are the quality suite's metrics, measured on each
# trial's held-out split after it trains. Each metric's natural direction:
DIRECTIONS: dict[str, Literal["minimize", "maximize"]] = {
    "eval_loss": "minimize",
    "loss": "minimize",
    "perplexity": "minimize",
    "rougeL": "maximize",
    "token_f1": "maximize",
    "exact_match": "maximize",
}
Objective = Literal["eval_loss", "loss", "perplexity", "rougeL", "token_f1", "exact_match"]

KINDS = ("log_uniform", "uniform", "int", "choice")
_SYNTAX = re.compile(r"^\s*(?P<kind>[A-Za-z_]\w*)\s*\((?P<args>.*)\)\s*$", re.DOTALL)
_USAGE = "use log_uniform(a, b), uniform(a, b), int(a, b) or choice([v1, v2, ...])"


@dataclass(frozen=True)
class Distribution:
    """A parsed, type-checked distribution: `low`/`high` for ranges, `choices` (validated values) for choice."""

    kind: Literal["log_uniform", "uniform", "int", "choice"]
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()


def parse_distribution(text: str) -> Distribution:
    """Read `kind(args)`; raises ValueError saying what is wrong. Types are checked by `check_distribution`."""
    m = _SYNTAX.match(text)
    if not m or m["kind"] not in KINDS:
        raise ValueError(f"not a distribution: {_USAGE}")
    kind, args = m["kind"], m["args"].strip()
    if kind == "choice":
        try:
            values = yaml.safe_load(args) if args else None
        except yaml.YAMLError:
            values = None
        if not isinstance(values, list) or not values:
            raise ValueError("choice takes a non-empty list, as in choice([8, 16, 32])")
        return Distribution("choice", choices=tuple(values))
    parts = [p.strip() for p in args.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{kind} takes two bounds, as in {kind}(1, 10)")
    try:
        low, high = (int(p) for p in parts) if kind == "int" else (float(p) for p in parts)
    except ValueError:
        what = "integers" if kind == "int" else "numbers"
        raise ValueError(f"the bounds of {kind} must be {what}") from None
    if not low < high:
        raise ValueError("the low bound must be below the high bound")
    if kind == "log_uniform" and low <= 0:
        raise ValueError("log_uniform needs a low bound above 0")
    return Distribution(kind, low=low, high=high)  # type: ignore[arg-type]  # kind is one of KINDS here


# What each kind of field may be drawn from, and how an error names it.
_FITS: dict[str, tuple[str, tuple[str, ...]]] = {
    "int": ("an integer", ("int", "choice")),
    "float": ("a number", ("log_uniform", "uniform", "int", "choice")),
    "other": ("one of a set of values", ("choice",)),
}


def _kind_of(annotation: Any) -> str:
    """`int` or `float` for a numeric field (optional or not), else `other` (drawn by choice only)."""
    args = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) else [annotation]
    if len(args) == 1 and args[0] is int:
        return "int"
    return "float" if len(args) == 1 and args[0] is float else "other"


def _field(key: str) -> Any:
    """The pydantic field a dotted key names, or raise ValueError with a "did you mean"."""
    from core.schema.job import JobConfig  # here, not at import: job.py imports this module

    keys: list[str] = []
    for section, info in JobConfig.model_fields.items():
        model = info.annotation
        model = next((a for a in get_args(model) if isinstance(a, type) and issubclass(a, BaseModel)), model)
        if isinstance(model, type) and issubclass(model, BaseModel):
            keys += [f"{section}.{name}" for name in model.model_fields]
            if key.startswith(f"{section}.") and key.removeprefix(f"{section}.") in model.model_fields:
                return model.model_fields[key.removeprefix(f"{section}.")]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"'{key}' is not a config key{hint}")


def check_distribution(key: str, text: str) -> Distribution:
    """Parse `text` and check it fits the job key `key`; raises ValueError naming what does not fit."""
    field = _field(key)
    if key.split(".")[0] not in SEARCHABLE_SECTIONS or key in NOT_SEARCHABLE:
        what = "bookkeeping, not a hyperparameter" if key in NOT_SEARCHABLE else "not a lora.* or training.* key"
        raise ValueError(f"'{key}' cannot be searched: it is {what}")
    dist = parse_distribution(text)
    what, allowed = _FITS[_kind_of(field.annotation)]
    if dist.kind not in allowed:
        forms = {"int": "int(a, b)", "log_uniform": "log_uniform(a, b)", "uniform": "uniform(a, b)"}
        use = " or ".join([forms[k] for k in allowed if k != "choice"] + ["choice([...])"])
        raise ValueError(f"'{key}' is {what}, so {dist.kind}(...) does not fit: use {use}")
    typed: Any = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    adapter: TypeAdapter[Any] = TypeAdapter(typed)
    values = dist.choices if dist.kind == "choice" else (dist.low, dist.high)
    checked = []
    for value in values:
        try:
            checked.append(adapter.validate_python(value))
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise ValueError(f"{value!r} is not a valid {key}: {reason}") from None
    if dist.kind != "choice":
        return dist
    if len({repr(v) for v in checked}) != len(checked):
        raise ValueError("a value is listed twice")
    return Distribution("choice", choices=tuple(checked))


class SweepConfig(Section):
    params: dict[str, str] = Field(
        min_length=1,
        description="Keys to search, as dotted job keys with a distribution: `training.learning_rate: "
        "log_uniform(1e-5, 1e-3)`, `lora.r: choice([8, 16, 32])`, `lora.dropout: uniform(0, 0.2)`, "
        "`training.epochs: int(1, 3)`.",
    )
    objective: Objective = Field(
        "eval_loss",
        description="What the search optimises: `eval_loss` (validation loss at the end of training) or a "
        "quality metric (loss, perplexity, rougeL, token_f1, exact_match) measured on the held-out split.",
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="`minimize` or `maximize`; default the objective's own (losses down, scores up)."
    )
    n_trials: int | None = Field(
        10, ge=1, description="Trials the study finishes in all (completed or pruned), counted across reruns."
    )
    timeout_minutes: float | None = Field(
        None, gt=0, description="Start no new trial after this many minutes of this invocation."
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler: `tpe` or `random`.")
    seed: int = Field(0, description="Seed of the sampler, so a study draws the same trials.")
    pruner: Literal["none", "median", "hyperband"] = Field(
        "median", description="Stop unpromising trials on the validation loss reported at each evaluation."
    )
    pruner_startup_trials: int = Field(2, ge=0, description="Median pruner: trials that finish before any is pruned.")
    pruner_warmup_steps: int = Field(
        0, ge=0, description="Median pruner: optimizer steps of a trial before it may be pruned."
    )
    storage: str | None = Field(
        None,
        pattern=r"^[A-Za-z][A-Za-z0-9+]*://",
        description="Optuna storage URL (`sqlite:///...`, `postgresql://...`) shared by workers; default a "
        "SQLite file in training.output_dir/sweep/.",
    )
    study_name: str | None = Field(None, min_length=1, description="Optuna study name; default the job file's name.")

    @field_validator("params", mode="before")
    @classmethod
    def _dotted(cls, params: Any) -> Any:
        """Nested keys (`lora: {r: ...}`, or the override `sweep.params.lora.r=...`) become dotted ones."""

        def flat(value: dict[Any, Any], prefix: str) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, item in value.items():
                name = f"{prefix}{key}"
                out.update(flat(item, f"{name}.") if isinstance(item, dict) else {name: item})
            return out

        return flat(params, "") if isinstance(params, dict) else params

    @field_validator("params")
    @classmethod
    def _check_params(cls, params: dict[str, str]) -> dict[str, str]:
        errors = []
        for key, text in params.items():
            try:
                check_distribution(key, text)
            except ValueError as exc:
                reason = PydanticCustomError("sweep_param", "{reason}", {"reason": str(exc)})
                errors.append(InitErrorDetails(type=reason, loc=(key,), input=text))
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return params

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        errors = []
        natural = DIRECTIONS[self.objective]
        if self.direction is not None and self.direction != natural:
            errors.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "sweep_direction",
                        "{objective} is better when {way}, so the search must {natural} it (or leave direction unset)",
                        {
                            "objective": self.objective,
                            "way": "lower" if natural == "minimize" else "higher",
                            "natural": natural,
                        },
                    ),
                    loc=("direction",),
                    input=self.direction,
                )
            )
        if self.n_trials is None and self.timeout_minutes is None:
            errors.append(
                InitErrorDetails(
                    type=PydanticCustomError("sweep_budget", "set n_trials, timeout_minutes or both", {}),
                    loc=("n_trials",),
                    input=None,
                )
            )
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    @property
    def goal(self) -> Literal["minimize", "maximize"]:
        return self.direction or DIRECTIONS[self.objective]

    def space(self) -> dict[str, Distribution]:
        """The searched keys and their checked distributions (choice values coerced to the key's type)."""
        return {key: check_distribution(key, text) for key, text in self.params.items()}
