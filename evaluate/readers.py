"""Read evaluation files into typed items, failing with the file and line of the first malformed record.

Standard files work by path (CrowS-Pairs CSV, BBQ JSONL); the suites we wrote ourselves ship in
`evaluate/suites/` so the default evaluation runs offline.
"""

from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DataError

SUITES_DIR = Path(__file__).parent / "suites"
DEFAULT_CROWS = SUITES_DIR / "crows_pairs.csv"
DEFAULT_BBQ = SUITES_DIR / "bbq.jsonl"
DEFAULT_COUNTERFACTUAL = SUITES_DIR / "counterfactual.jsonl"

Message = dict[str, str]


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


def _fail(path: Path, line: int | None, problem: str) -> DataError:
    where = f"{path}:{line}" if line else str(path)
    return DataError(f"{where}: {problem}")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"evaluation file not found: {path}")


def _nonempty(items: list[Any], path: Path, what: str) -> None:
    if not items:
        raise DataError(f"{path}: the {what} suite is empty (no items to evaluate)")


def _json_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Every non-blank line of a JSONL file as (line number, object)."""
    _require_file(path)
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _fail(path, lineno, f"invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise _fail(path, lineno, "each line must be a JSON object")
            rows.append((lineno, obj))
    return rows


def _text(obj: dict[str, Any], key: str, path: Path, line: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, line, f"missing or empty string field '{key}'")
    return value


def read_crows(path: Path, limit: int | None = None) -> list[CrowsPair]:
    """CrowS-Pairs CSV: `sent_more`, `sent_less`, `stereo_antistereo`, `bias_type` (other columns ignored)."""
    _require_file(path)
    pairs: list[CrowsPair] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        needed = {"sent_more", "sent_less", "stereo_antistereo", "bias_type"}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise _fail(path, 1, f"missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            line = reader.line_num
            if None in row:
                raise _fail(path, line, "more fields than the header has")
            values = {k: (row.get(k) or "").strip() for k in needed}
            empty = [k for k in sorted(needed) if not values[k]]
            if empty:
                raise _fail(path, line, f"empty field(s) {', '.join(empty)}")
            if values["stereo_antistereo"] not in {"stereo", "antistereo"}:
                raise _fail(path, line, "stereo_antistereo must be 'stereo' or 'antistereo'")
            pairs.append(
                CrowsPair(
                    id=(row.get("") or row.get("id") or str(len(pairs))).strip(),
                    sent_more=row["sent_more"],
                    sent_less=row["sent_less"],
                    direction=values["stereo_antistereo"],
                    bias_type=values["bias_type"],
                )
            )
            if limit and len(pairs) >= limit:
                break
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
        raise _fail(path, line, "answer_info must map ans0..ans2 to lists of group labels")
    if not isinstance(meta, dict) or not isinstance(meta.get("stereotyped_groups"), list):
        raise _fail(path, line, "additional_metadata.stereotyped_groups must be a list")
    stereotyped = {str(g).lower() for g in meta["stereotyped_groups"]}
    groups = [_groups_of(info[f"ans{i}"]) for i in range(3)]
    unknown = [i for i in range(3) if "unknown" in groups[i]]
    if len(unknown) != 1:
        answers = [str(obj.get(f"ans{i}", "")).lower() for i in range(3)]
        unknown = [i for i in range(3) if any(w in answers[i] for w in _UNKNOWN_WORDS)]
    if len(unknown) != 1:
        raise _fail(path, line, "exactly one answer must be the 'unknown' one (answer_info label 'unknown')")
    polarity = obj.get("question_polarity")
    biased = []
    for i in range(3):
        if i == unknown[0]:
            continue
        targeted = bool(groups[i] & stereotyped)
        if (polarity == "neg" and targeted) or (polarity == "nonneg" and not targeted):
            biased.append(i)
    return unknown[0], tuple(biased)


def read_bbq(path: Path, limit: int | None = None) -> list[BbqItem]:
    """BBQ JSONL: context, question, ans0..2, label, context_condition, answer_info, question_polarity, ..."""
    items: list[BbqItem] = []
    for line, obj in _json_lines(path):
        answers = tuple(_text(obj, f"ans{i}", path, line) for i in range(3))
        label = obj.get("label")
        if not isinstance(label, int) or label not in (0, 1, 2):
            raise _fail(path, line, "label must be 0, 1 or 2")
        condition = obj.get("context_condition")
        if condition not in {"ambig", "disambig"}:
            raise _fail(path, line, "context_condition must be 'ambig' or 'disambig'")
        polarity = obj.get("question_polarity")
        if polarity not in {"neg", "nonneg"}:
            raise _fail(path, line, "question_polarity must be 'neg' or 'nonneg'")
        unknown, biased = _bbq_answer_roles(obj, path, line)
        items.append(
            BbqItem(
                id=str(obj.get("example_id", len(items))),
                category=str(obj.get("category", "all")),
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
    _nonempty(items, path, "BBQ")
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
            raise _fail(path, line, f"bad template ({exc})") from None
        raw = obj.get("groups")
        groups: dict[str, dict[str, str]]
        if isinstance(raw, list) and all(isinstance(g, str) for g in raw):
            groups = {g: {"group": g} for g in raw}
        elif isinstance(raw, dict) and all(isinstance(v, dict) for v in raw.values()):
            groups = {str(k): {str(a): str(b) for a, b in v.items()} for k, v in raw.items()}
        else:
            raise _fail(path, line, "groups must be a list of strings or an object of {group: {slot: text}}")
        if len(groups) < 2:
            raise _fail(path, line, "a counterfactual template needs at least two groups")
        for name, values in groups.items():
            if slots - set(values):
                missing = ", ".join(sorted(slots - set(values)))
                raise _fail(path, line, f"group '{name}' fills no value for placeholder(s) {missing}")
        items.append(CounterfactualTemplate(str(obj.get("id", len(items))), axis, template, groups))
        if limit and len(items) >= limit:
            break
    _nonempty(items, path, "counterfactual")
    return items


def _chat_item(obj: dict[str, Any], path: Path, line: int, idx: str) -> QualityItem:
    """Any of the training data shapes except plain text, split into prompt messages and reference answer."""
    source = path.name
    if "messages" in obj:
        msgs = obj["messages"]
        ok = isinstance(msgs, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
        if not ok or len(msgs) < 2:
            raise _fail(path, line, "messages must be a list of {role, content} with at least a prompt and answer")
        if msgs[-1]["role"] != "assistant":
            raise _fail(path, line, "the last message must be the assistant's reference answer")
        messages = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
        return QualityItem(idx, source, messages, msgs[-1]["content"])
    if "instruction" in obj and "output" in obj:
        prompt = _text(obj, "instruction", path, line)
        extra = obj.get("input")
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return QualityItem(idx, source, [{"role": "user", "content": prompt}], _text(obj, "output", path, line))
    if "prompt" in obj and "completion" in obj:
        prompt = _text(obj, "prompt", path, line)
        return QualityItem(idx, source, [{"role": "user", "content": prompt}], _text(obj, "completion", path, line))
    raise _fail(path, line, "no reference answer: use `messages`, `instruction`/`output` or `prompt`/`completion`")


def read_quality(path: Path, limit: int | None = None) -> list[QualityItem]:
    """Quality items from JSONL, a JSON list, or CSV; at most `limit`, in file order."""
    _require_file(path)
    rows: list[tuple[int, dict[str, Any]]]
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = [(reader.line_num, dict(r)) for r in reader]
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise _fail(path, exc.lineno, f"invalid JSON ({exc.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise _fail(path, None, "a JSON evaluation file must hold a list of objects")
        rows = [(i + 1, r) for i, r in enumerate(data)]
    else:
        rows = _json_lines(path)
    items = []
    for line, obj in rows:
        items.append(_chat_item(obj, path, line, f"{path.stem}:{line}"))
        if limit and len(items) >= limit:
            break
    _nonempty(items, path, "quality")
    return items
