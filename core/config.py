"""Load a YAML job file plus `key=value` overrides into a pydantic schema, reporting every problem at once.

Each problem names its dotted path and the line in the file, with a "did you mean" for misspelt keys.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from core.errors import ConfigError

T = TypeVar("T", bound=BaseModel)
Loc = tuple[str | int, ...]


def _line_map(node: yaml.Node, prefix: Loc = ()) -> dict[Loc, int]:
    """Map each key path in a composed YAML tree to its 1-based line number."""
    lines: dict[Loc, int] = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            lines.update(_line_map(value_node, path))
            lines[path] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_map(item, (*prefix, i)))
    return lines


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[Loc, int]]:
    """Read a YAML mapping and the line of every key in it."""
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], source=str(path))
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError([f"{where}invalid YAML: {getattr(exc, 'problem', exc)}"], source=str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError(["the file must hold a mapping of sections (model:, data:, ...)"], source=str(path))
    return data, _line_map(node) if node is not None else {}


def parse_override(item: str) -> tuple[list[str], Any]:
    """`training.learning_rate=1e-4` -> (["training", "learning_rate"], 0.0001); values parse as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {item!r} is not of the form key=value"])
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        target = data
        for key in keys[:-1]:
            nxt = target.get(key)
            if not isinstance(nxt, dict):
                nxt = {}
                target[key] = nxt
            target = nxt
        target[keys[-1]] = value
    return data


def _fields_at(schema: type[BaseModel], loc: Loc) -> list[str]:
    """Names of the fields allowed at a location, for "did you mean"."""
    model: Any = schema
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = field.annotation
        for arg in getattr(model, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def format_problems(
    exc: ValidationError, schema: type[BaseModel], lines: dict[Loc, int], overridden: set[str]
) -> list[str]:
    problems = []
    for err in exc.errors():
        loc: Loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # Drop pydantic's union-member tags such as 'list[str]' from the location.
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in {"str", "int", "float"})))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(schema, loc[:-1]), n=1, cutoff=0.6)
            if close:
                msg += f"; did you mean '{close[0]}'?"
        elif "input" in err and err["type"] not in {"missing"}:
            msg += f" (got {err['input']!r})"
        if dotted in overridden:
            where = "command line"
        else:
            line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
            where = f"line {line}" if line else "not set"
        problems.append(f"{dotted} ({where}): {msg}")
    return problems


def load_config(schema: type[T], path: Path | None, overrides: list[str] | None = None) -> T:
    """Validate a YAML file (or no file, all defaults) plus overrides; raise ConfigError listing every problem."""
    overrides = overrides or []
    data, lines = read_yaml(path) if path is not None else ({}, {})
    data = apply_overrides(data, overrides)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        overridden = {".".join(parse_override(o)[0]) for o in overrides}
        raise ConfigError(format_problems(exc, schema, lines, overridden), source=str(path) if path else None) from None


def resolved_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def config_hash(cfg: BaseModel) -> str:
    """Stable digest of the resolved config (defaults filled), logged with every run."""
    blob = json.dumps(resolved_dict(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to string values, for MLflow params."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | bool) or value is None else str(value)
    return out
