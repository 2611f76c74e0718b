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


# A job file is a few hundred keys; YAML aliases can make a few hundred bytes expand to billions of them.
MAX_EXPANDED_NODES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes the tree holds once every alias is expanded; memoised per node, so linear in the file."""
    if id(node) in sizes:
        return sizes[id(node)]
    size = 1
    if isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes) for item in node.value)
    sizes[id(node)] = size
    return size


def _line_map(node: yaml.Node, prefix: Loc = (), seen: set[int] | None = None) -> dict[Loc, int]:
    """Map each key path in a composed YAML tree to its 1-based line number.

    A node reached again through an alias is not walked again: its keys keep the lines of the anchor.
    """
    seen = set() if seen is None else seen
    lines: dict[Loc, int] = {prefix: node.start_mark.line + 1}
    if id(node) in seen:
        return lines
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            lines.update(_line_map(value_node, path, seen))
            lines[path] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_map(item, (*prefix, i), seen))
    return lines


def _unreadable_line(node: yaml.Node) -> int | None:
    """The line of the first integer too long for Python to convert."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, yaml.ScalarNode):
            if current.tag.endswith(":int") and len(current.value) > 4000:
                return current.start_mark.line + 1
        elif isinstance(current, yaml.MappingNode):
            stack.extend(v for pair in reversed(current.value) for v in reversed(pair))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(reversed(current.value))
    return None


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[Loc, int]]:
    """Read a YAML mapping and the line of every key in it."""
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], source=str(path))
    text = path.read_text()
    try:
        node = yaml.compose(text)
        if node is not None and _expanded_size(node, {}) > MAX_EXPANDED_NODES:
            raise ConfigError(
                [f"YAML aliases expand to more than {MAX_EXPANDED_NODES:,} values; a job file needs far fewer"],
                source=str(path),
            )
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError([f"{where}invalid YAML: {getattr(exc, 'problem', exc)}"], source=str(path)) from exc
    except RecursionError:
        raise ConfigError(["the YAML is nested too deeply"], source=str(path)) from None
    except ValueError as exc:  # an integer of more digits than Python converts
        line = _unreadable_line(node) if node is not None else None
        where = f"line {line}: " if line else ""
        raise ConfigError([f"{where}a value cannot be read: {exc}"], source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(["the file must hold a mapping of sections (model:, data:, ...)"], source=str(path))
    return data, _line_map(node) if node is not None else {}


def parse_override(item: str) -> tuple[list[str], Any]:
    """`training.learning_rate=1e-4` -> (["training", "learning_rate"], 0.0001); values parse as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {item!r} is not of the form key=value"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError([f"override {key.strip()}: the value cannot be read ({type(exc).__name__})"]) from None
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
        elif "input" in err and err["type"] not in {"missing"} and not (err.get("ctx") or {}).get("secret"):
            shown = repr(err["input"])
            msg += f" (got {shown if len(shown) <= 200 else shown[:200] + '...'})"
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
