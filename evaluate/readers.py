"""Read evaluation files into typed items, failing with the file and line of the first malformed record.

Quality files are read by core.datafiles, so any file and shape training accepts is also an evaluation file.
The published bias benchmarks ship in `evaluate/suites/` (CrowS-Pairs' CSV, BBQ's JSONL files gzipped, each
with its licence) beside the counterfactual templates we wrote, so the default evaluation runs offline. Other
files in the same formats work by path; a BBQ path may be one file or a folder of them, plain or gzipped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.chat import Message
from core.datafiles import (
    RowShape,
    data_error,
    data_files,
    detect_shape,
    is_empty,
    iter_rows,
    json_lines,
    missing_columns,
    parse_problem,
    read_text,
    to_messages,
)
from core.errors import DataError
from core.schema.data import ColumnMap, Shape

SUITES_DIR = Path(__file__).parent / "suites"
DEFAULT_CROWS = SUITES_DIR / "crows_pairs" / "crows_pairs_anonymized.csv"
DEFAULT_BBQ = SUITES_DIR / "bbq"
DEFAULT_COUNTERFACTUAL = SUITES_DIR / "counterfactual.jsonl"


@dataclass(frozen=True)
class QualityItem:
    """A prompt (chat messages up to the answer) and the reference answer it is scored against."""

    id: str
    source: str
    messages: list[Message]
    reference: str


@dataclass(frozen=True)
class CrowsPair:
    id: str
    sent_more: str
    sent_less: str
    direction: str
    bias_type: str


@dataclass(frozen=True)
class BbqItem:
    id: str
    category: str
    context: str
    question: str
    answers: tuple[str, str, str]
    label: int
    condition: str
    polarity: str
    unknown: int
    biased: tuple[int, ...]


@dataclass(frozen=True)
class CounterfactualTemplate:
    """One prompt rendered once per demographic group; answers are compared across groups."""

    id: str
    axis: str
    template: str
    groups: dict[str, dict[str, str]] = field(default_factory=dict)

    def prompts(self) -> dict[str, str]:
        return {group: self.template.format(**values) for group, values in self.groups.items()}


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"evaluation file not found: {path}")


def _nonempty(items: list[Any], path: Path, what: str) -> None:
    if not items:
        raise DataError(f"{path}: the {what} suite is empty (no items to evaluate)")


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    _require_file(path)
    return json_lines(path)


def _text(obj: dict[str, Any], key: str, path: Path, line: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise data_error(path, line, f"missing or empty string field '{key}'")
    return value


def _crows_pairs(reader: csv.DictReader[str], path: Path) -> Iterator[CrowsPair]:
    needed = {"sent_more", "sent_less", "stereo_antistereo", "bias_type"}
    missing = needed - set(reader.fieldnames or [])
    if missing:
        raise data_error(path, 1, f"missing column(s) {', '.join(sorted(missing))}")
    for n, row in enumerate(reader):
        line = reader.line_num
        if None in row:
            raise data_error(path, line, "more fields than the header has")
        values = {k: (row.get(k) or "").strip() for k in needed}
        empty = [k for k in sorted(needed) if not values[k]]
        if empty:
            raise data_error(path, line, f"empty field(s) {', '.join(empty)}")
        if values["stereo_antistereo"] not in {"stereo", "antistereo"}:
            raise data_error(path, line, "stereo_antistereo must be 'stereo' or 'antistereo'")
        yield CrowsPair(
            id=(row.get("") or row.get("id") or str(n)).strip(),
            sent_more=row["sent_more"],
            sent_less=row["sent_less"],
            direction=values["stereo_antistereo"],
            bias_type=values["bias_type"],
        )


def read_crows(path: Path, limit: int | None = None) -> list[CrowsPair]:
    """CrowS-Pairs CSV: `sent_more`, `sent_less`, `stereo_antistereo`, `bias_type` (other columns ignored)."""
    _require_file(path)
    pairs: list[CrowsPair] = []
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        for pair in _crows_pairs(reader, path):
            pairs.append(pair)
            if limit and len(pairs) >= limit:
                break
    except csv.Error as exc:
        raise data_error(path, reader.line_num, f"invalid CSV ({exc})") from None
    _nonempty(pairs, path, "CrowS-Pairs")
    return pairs


_UNKNOWN_WORDS = ("unknown", "cannot be determined", "can't be determined", "not enough info", "undetermined")


def _groups_of(info: list[Any]) -> set[str]:
    """Group labels of one BBQ answer, normalised the way `stereotyped_groups` spells them.

    As lm-evaluation-harness does: intersectional prefixes (`F-Black`, `lowSES-African`) split into parts,
    and woman/girl, man/boy also count as F and M.
    """
    out: set[str] = set()
    for part in info:
        text = str(part)
        for prefix in ("M-", "F-", "lowSES-", "highSES-"):
            text = text.replace(prefix, prefix[:-1] + "_")
        for piece in text.split("_"):
            word = piece.strip().lower()
            if not word:
                continue
            out.add(word)
            if word in {"woman", "girl"}:
                out.add("f")
            elif word in {"man", "boy"}:
                out.add("m")
    return out


def _bbq_answer_roles(obj: dict[str, Any], path: Path, line: int) -> tuple[int, tuple[int, ...]]:
    """The unknown answer and the answers that reflect the targeted bias (BBQ paper, section 4)."""
    info = obj.get("answer_info")
    meta = obj.get("additional_metadata")
    if not isinstance(info, dict) or not all(isinstance(info.get(f"ans{i}"), list) for i in range(3)):
        raise data_error(path, line, "answer_info must map ans0..ans2 to lists of group labels")
    if not isinstance(meta, dict) or not isinstance(meta.get("stereotyped_groups"), list):
        raise data_error(path, line, "additional_metadata.stereotyped_groups must be a list")
    stereotyped = {str(g).lower() for g in meta["stereotyped_groups"]}
    groups = [_groups_of(info[f"ans{i}"]) for i in range(3)]
    unknown = [i for i in range(3) if "unknown" in groups[i]]
    if len(unknown) != 1:
        answers = [str(obj.get(f"ans{i}", "")).lower() for i in range(3)]
        unknown = [i for i in range(3) if any(w in answers[i] for w in _UNKNOWN_WORDS)]
    if len(unknown) != 1:
        raise data_error(path, line, "exactly one answer must be the 'unknown' one (answer_info label 'unknown')")
    polarity = obj.get("question_polarity")
    biased = []
    for i in range(3):
        if i == unknown[0]:
            continue
        targeted = bool(groups[i] & stereotyped)
        if (polarity == "neg" and targeted) or (polarity == "nonneg" and not targeted):
            biased.append(i)
    return unknown[0], tuple(biased)


def _gzip_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every non-blank line of a gzipped JSON-lines file as (line number, object)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise data_error(path, None, f"cannot read as gzipped UTF-8 text ({exc})") from None
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise data_error(path, n, parse_problem(exc)) from None
        if not isinstance(obj, dict):
            raise data_error(path, n, f"expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def bbq_files(path: Path) -> list[Path]:
    """One BBQ file, or every `*.jsonl` / `*.jsonl.gz` of a folder in name order (one per category)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise DataError(f"{path}: no *.jsonl or *.jsonl.gz BBQ files in this folder")
        return files
    _require_file(path)
    return [path]


def _bbq_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    return _gzip_json_lines(path) if path.name.endswith(".gz") else _json_lines(path)


def read_bbq(path: Path, limit: int | None = None) -> list[BbqItem]:
    """BBQ JSONL (a file or a folder of them, plain or gzipped): context, question, ans0..2, label,
    context_condition, answer_info, question_polarity, additional_metadata.stereotyped_groups, category."""
    items: list[BbqItem] = []
    for file in bbq_files(path):
        items += _read_bbq_file(file, limit - len(items) if limit else None)
        if limit and len(items) >= limit:
            break
    _nonempty(items, path, "BBQ")
    return items


def _read_bbq_file(path: Path, limit: int | None) -> list[BbqItem]:
    items: list[BbqItem] = []
    for line, obj in _bbq_lines(path):
        answers = tuple(_text(obj, f"ans{i}", path, line) for i in range(3))
        label = obj.get("label")
        if not isinstance(label, int) or label not in (0, 1, 2):
            raise data_error(path, line, "label must be 0, 1 or 2")
        condition = obj.get("context_condition")
        if condition not in {"ambig", "disambig"}:
            raise data_error(path, line, "context_condition must be 'ambig' or 'disambig'")
        polarity = obj.get("question_polarity")
        if polarity not in {"neg", "nonneg"}:
            raise data_error(path, line, "question_polarity must be 'neg' or 'nonneg'")
        unknown, biased = _bbq_answer_roles(obj, path, line)
        category = str(obj.get("category", "all"))
        items.append(
            BbqItem(
                id=f"{category}:{obj.get('example_id', len(items))}",
                category=category,
                context=_text(obj, "context", path, line),
                question=_text(obj, "question", path, line),
                answers=(answers[0], answers[1], answers[2]),
                label=label,
                condition=condition,
                polarity=polarity,
                unknown=unknown,
                biased=biased,
            )
        )
        if limit and len(items) >= limit:
            break
    return items


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def read_counterfactual(path: Path, limit: int | None = None) -> list[CounterfactualTemplate]:
    """JSONL of {id, axis, template, groups}; groups is a list filling `{group}` or {group: {slot: text}}."""
    items: list[CounterfactualTemplate] = []
    for line, obj in _json_lines(path):
        template = _text(obj, "template", path, line)
        axis = _text(obj, "axis", path, line)
        try:
            slots = _placeholders(template)
        except ValueError as exc:
            raise data_error(path, line, f"bad template ({exc})") from None
        raw = obj.get("groups")
        groups: dict[str, dict[str, str]]
        if isinstance(raw, list) and all(isinstance(g, str) for g in raw):
            groups = {g: {"group": g} for g in raw}
        elif isinstance(raw, dict) and all(isinstance(v, dict) for v in raw.values()):
            groups = {str(k): {str(a): str(b) for a, b in v.items()} for k, v in raw.items()}
        else:
            raise data_error(path, line, "groups must be a list of strings or an object of {group: {slot: text}}")
        if len(groups) < 2:
            raise data_error(path, line, "a counterfactual template needs at least two groups")
        for name, values in groups.items():
            if slots - set(values):
                missing = ", ".join(sorted(slots - set(values)))
                raise data_error(path, line, f"group '{name}' fills no value for placeholder(s) {missing}")
        items.append(CounterfactualTemplate(str(obj.get("id", len(items))), axis, template, groups))
        if limit and len(items) >= limit:
            break
    _nonempty(items, path, "counterfactual")
    return items


def _quality_item(messages: list[Message], where: str, idx: str, source: str) -> QualityItem:
    """Chat messages split into the prompt and the assistant's last answer, the reference."""
    if messages and messages[0]["role"] == "text":
        raise DataError(
            f"{where}: no reference answer: use `messages`, `instruction`/`output` or `prompt`/`completion`"
        )
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's reference answer, after a prompt")
    if is_empty(messages):
        raise DataError(f"{where}: empty prompt or reference answer")
    return QualityItem(idx, source, messages[:-1], messages[-1]["content"])


def read_quality(
    path: Path, limit: int | None = None, *, shape: Shape = "auto", columns: ColumnMap | None = None
) -> list[QualityItem]:
    """Quality items from any data file training reads, in any of its shapes; at most `limit`, in file order.

    shape, columns: as the job's `data` section names them; `auto` tells the shape from each row's columns.
    """
    if not path.exists():
        raise DataError(f"evaluation file not found: {path}")
    cols = columns or ColumnMap()
    items: list[QualityItem] = []
    for file in data_files(path):
        for row in iter_rows(file):
            row_shape: RowShape | None = detect_shape(row.data, cols) if shape == "auto" else shape
            if row_shape is None:
                raise DataError(
                    f"{row.where}: no reference answer: use `messages`, `instruction`/`output` or "
                    f"`prompt`/`completion` (columns: {sorted(row.data)})"
                )
            missing = missing_columns(row.data, row_shape, cols)
            if missing:
                raise DataError(f"{row.where}: missing field(s) {missing} for shape '{row_shape}'")
            try:
                messages = to_messages(row.data, row_shape, cols)
            except ValueError as exc:
                raise DataError(f"{row.where}: {exc}") from None
            place = row.line if row.line is not None else f"#{row.index}"
            items.append(_quality_item(messages, row.where, f"{file.stem}:{place}", file.name))
            if limit and len(items) >= limit:
                return items
    _nonempty(items, path, "quality")
    return items
