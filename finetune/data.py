"""Training data as chat examples: where `data.path` points, one shape for the whole set, malformed and empty
rows collected and reported. Reading files and converting rows is core.datafiles, shared with evaluation.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from core.chat import Message
from core.datafiles import data_files, detect_shape, is_empty, iter_rows, missing_columns, to_messages
from core.errors import DataError
from core.schema.data import DataConfig

BUILTIN = {
    "builtin:zaragoza-faq": ("zaragoza_construction_faq", "data/faq-en-alpaca.jsonl"),
    "builtin:zaragoza-faq-chat": ("zaragoza_construction_faq", "data/faq-en-sharegpt.jsonl"),
}


@dataclass
class Example:
    messages: list[Message]
    source: str  # "file:line"


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


def read_examples(cfg: DataConfig, path: Path | None = None) -> ReadResult:
    """Read every file, detect the shape, convert rows; collect malformed and empty rows by file:line."""
    root = resolve_path(path or cfg.path)
    try:
        files = data_files(root)
    except DataError as exc:
        raise DataError(f"data.path: {exc}") from None
    malformed: list[str] = []
    empty: list[str] = []
    examples: list[Example] = []
    rows_read = 0
    shape = None if cfg.shape == "auto" else cfg.shape
    for f in files:
        for row in iter_rows(f, malformed):
            rows_read += 1
            if shape is None:
                shape = detect_shape(row.data, cfg.columns)
                if shape is None:
                    raise DataError(
                        f"{row.where}: cannot tell the example shape from columns {sorted(row.data)}; expected "
                        "messages, instruction+output, prompt+completion or text (set data.shape/data.columns)"
                    )
            missing = missing_columns(row.data, shape, cfg.columns)
            if missing:
                if f.suffix.lower() == ".csv":
                    raise DataError(
                        f"{f}: CSV has no column(s) {missing} needed for shape '{shape}' "
                        f"(columns: {sorted(row.data)}); map them with data.columns"
                    )
                malformed.append(f"{row.where}: missing field(s) {missing} for shape '{shape}'")
                continue
            try:
                messages = to_messages(row.data, shape, cfg.columns)
            except ValueError as exc:
                malformed.append(f"{row.where}: {exc}")
                continue
            if is_empty(messages):
                empty.append(row.where)
                continue
            examples.append(Example(messages, row.where))
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
    return ReadResult(examples, malformed, empty, rows_read, files, shape or "unknown")
