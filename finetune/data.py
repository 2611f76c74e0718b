"""Read training data from files into chat examples, whatever the file format and example shape.

Every example keeps where it came from (file and line) so that each problem can be pointed at.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from core.errors import DataError
from core.schema.data import ColumnMap, DataConfig

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN = {
    "builtin:zaragoza-faq": ("zaragoza_construction_faq", "data/faq-en-alpaca.jsonl"),
    "builtin:zaragoza-faq-chat": ("zaragoza_construction_faq", "data/faq-en-sharegpt.jsonl"),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class Example:
    messages: list[dict[str, str]]
    source: str  # "file:line"


@dataclass
class RawRow:
    row: dict[str, Any]
    source: str


@dataclass
class ReadResult:
    examples: list[Example]
    malformed: list[str]  # "file:line: why"
    empty: list[str]
    rows_read: int
    files: list[Path]
    shape: str

    @functools.cached_property
    def digest(self) -> str:
        """Content digest of every file read, a saved `datasets` folder's files included; computed once."""
        h = hashlib.sha256()
        for f in self.files:
            parts = sorted(p for p in f.rglob("*") if p.is_file()) if f.is_dir() else [f]
            for part in parts:
                h.update(str(part.relative_to(f.parent)).encode())
                h.update(part.read_bytes())
        return h.hexdigest()[:16]


def resolve_path(path: Path) -> Path:
    """Map `builtin:` names to files inside their packages; check that anything else exists."""
    key = str(path)
    if key in BUILTIN:
        package, rel = BUILTIN[key]
        try:
            return Path(str(resources.files(package).joinpath(rel)))
        except ModuleNotFoundError:
            raise DataError(f"data.path {key} needs the package {package}: pip install {package}") from None
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    return path


def data_files(path: Path) -> list[Path]:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return [path]
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"data.path: folder {path} holds no .jsonl, .json, .csv or .parquet files")
        return files
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"data.path: {path} has suffix '{path.suffix}'; expected one of {', '.join(SUFFIXES)}")
    return [path]


def _rows(path: Path, malformed: list[str]) -> Iterator[RawRow]:
    """Yield each row with its file:line (JSONL, CSV) or file:#index (JSON, Parquet, datasets)."""
    if path.is_dir():
        from datasets import Dataset, DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        assert isinstance(ds, Dataset)
        for i, row in enumerate(ds):
            yield RawRow(dict(row), f"{path}:#{i}")
        return
    kind = SUFFIXES[path.suffix.lower()]
    if kind == "jsonl":
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    malformed.append(f"{path}:{n}: invalid JSON ({exc.msg})")
                    continue
                if not isinstance(row, dict):
                    malformed.append(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                    continue
                yield RawRow(row, f"{path}:{n}")
    elif kind == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        for i, row in enumerate(data):
            if isinstance(row, dict):
                yield RawRow(row, f"{path}:#{i}")
            else:
                malformed.append(f"{path}:#{i}: expected a JSON object, got {type(row).__name__}")
    elif kind == "csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                yield RawRow({k: v for k, v in row.items() if k is not None}, f"{path}:{reader.line_num}")
    else:
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield RawRow(row, f"{path}:#{i}")


def detect_shape(columns: set[str], cols: ColumnMap) -> str | None:
    if cols.messages in columns or "conversations" in columns:
        return "chat"
    if cols.instruction in columns and cols.output in columns:
        return "instruction"
    if cols.prompt in columns and cols.completion in columns:
        return "prompt_completion"
    if cols.text in columns:
        return "text"
    return None


def required_columns(shape: str, cols: ColumnMap) -> list[str]:
    return {
        "chat": [cols.messages],
        "instruction": [cols.instruction, cols.output],
        "prompt_completion": [cols.prompt, cols.completion],
        "text": [cols.text],
    }[shape]


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def to_messages(row: dict[str, Any], shape: str, cfg: DataConfig) -> list[dict[str, str]]:
    """One row to chat messages; raises ValueError with the reason when the row does not fit its shape."""
    cols = cfg.columns
    if shape == "chat":
        raw = row.get(cols.messages, row.get("conversations"))
        if isinstance(raw, str):
            raw = json.loads(raw)
        if not isinstance(raw, list):
            raise ValueError(f"'{cols.messages}' must be a list of messages")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise ValueError(f"message {i} is not an object")
            role = m.get("role", SHAREGPT_ROLES.get(str(m.get("from")), m.get("from")))
            content = m.get("content", m.get("value"))
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"message {i} needs a role (system/user/assistant) and string content")
            messages.append({"role": str(role), "content": content.strip()})
        return messages
    if shape == "instruction":
        prompt = _text(row.get(cols.instruction))
        extra = _text(row.get(cols.input))
        if extra:
            prompt = f"{prompt}\n\n{extra}" if prompt else extra
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(row.get(cols.output))},
        ]
    if shape == "prompt_completion":
        return [
            {"role": "user", "content": _text(row.get(cols.prompt))},
            {"role": "assistant", "content": _text(row.get(cols.completion))},
        ]
    return [{"role": "text", "content": _text(row.get(cols.text))}]


def is_empty(messages: list[dict[str, str]]) -> bool:
    if not messages or any(not m["content"] for m in messages if m["role"] != "system"):
        return True
    return not any(m["role"] in ("assistant", "text") for m in messages)


def read_examples(cfg: DataConfig, path: Path | None = None) -> ReadResult:
    """Read every file, detect the shape, convert rows; collect malformed and empty rows by file:line."""
    root = resolve_path(path or cfg.path)
    files = data_files(root)
    malformed: list[str] = []
    empty: list[str] = []
    examples: list[Example] = []
    rows_read = 0
    shape: str = cfg.shape
    for f in files:
        for raw in _rows(f, malformed):
            rows_read += 1
            if shape == "auto":
                detected = detect_shape(set(raw.row), cfg.columns)
                if detected is None:
                    raise DataError(
                        f"{raw.source}: cannot tell the example shape from columns {sorted(raw.row)}; expected "
                        "messages, instruction+output, prompt+completion or text (set data.shape/data.columns)"
                    )
                shape = detected
            missing = [c for c in required_columns(shape, cfg.columns) if c not in raw.row]
            if shape == "chat" and "conversations" in raw.row:
                missing = []
            if missing:
                if f.suffix.lower() == ".csv":
                    raise DataError(
                        f"{f}: CSV has no column(s) {missing} needed for shape '{shape}' "
                        f"(columns: {sorted(raw.row)}); map them with data.columns"
                    )
                malformed.append(f"{raw.source}: missing field(s) {missing} for shape '{shape}'")
                continue
            try:
                messages = to_messages(raw.row, shape, cfg)
            except (ValueError, json.JSONDecodeError) as exc:
                malformed.append(f"{raw.source}: {exc}")
                continue
            if is_empty(messages):
                empty.append(raw.source)
                continue
            examples.append(Example(messages, raw.source))
    if malformed and cfg.on_malformed == "error":
        shown = "\n  ".join(malformed[:20])
        more = f"\n  ... and {len(malformed) - 20} more" if len(malformed) > 20 else ""
        raise DataError(
            f"{len(malformed)} malformed row(s) (set data.on_malformed=skip to drop them):\n  {shown}{more}"
        )
    if rows_read == 0:
        raise DataError(f"data.path: {root} holds no rows")
    if not examples:
        raise DataError(f"data.path: none of the {rows_read} rows in {root} is a usable example (all empty)")
    return ReadResult(examples, malformed, empty, rows_read, files, shape if shape != "auto" else "unknown")
