"""Read example rows from data files and turn each into chat messages, the same way for training and evaluation.

Every row keeps where it came from (file and line, or file and row number where a format has no lines), and
every problem with a file — bad JSON, bytes that are not UTF-8, a number or nesting too large to parse, a row
that does not fit its shape — is a DataError naming that place, never a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.chat import Message
from core.errors import DataError
from core.schema.data import ColumnMap

RowShape = Literal["chat", "instruction", "prompt_completion", "text"]

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SHAREGPT_COLUMN = "conversations"
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_NOT_WS = re.compile(r"[^ \t\n\r]")


@dataclass(frozen=True)
class Row:
    """One record of a data file; `line` is set for formats that have lines (JSONL, CSV, a JSON list)."""

    data: dict[str, Any]
    file: Path
    index: int
    line: int | None = None

    @property
    def where(self) -> str:
        """`file:line`, or `file:#index` (0-based) for Parquet, a saved `datasets` folder or `{"data": [...]}`."""
        return f"{self.file}:{self.line}" if self.line is not None else f"{self.file}:#{self.index}"


def data_error(path: Path | str, line: int | None, problem: str) -> DataError:
    """A DataError that starts with the place it is about, `file:line: problem` (or `file: problem`)."""
    where = f"{path}:{line}" if line else str(path)
    return DataError(f"{where}: {problem}")


def parse_problem(exc: ValueError | RecursionError) -> str:
    """Why json could not parse a piece of text, in words a user can act on."""
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON ({exc.msg})"
    if isinstance(exc, RecursionError):
        return "invalid JSON (nested too deeply to read)"
    if "integer string conversion" in str(exc):
        return f"invalid JSON (a number longer than {sys.get_int_max_str_digits()} digits)"
    return f"invalid JSON ({exc})"


def data_files(path: Path) -> list[Path]:
    """The files a path stands for: itself, every data file under a folder, or a saved `datasets` folder."""
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return [path]
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"folder {path} holds no .jsonl, .json, .csv or .parquet files")
        return files
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path} has suffix '{path.suffix}'; expected one of {', '.join(SUFFIXES)}")
    return [path]


def iter_rows(path: Path, malformed: list[str] | None = None) -> Iterator[Row]:
    """Each row of one data file (or saved `datasets` folder), in order, with its place.

    A row that cannot be parsed raises a DataError naming its place, or, when `malformed` is a list, is
    reported there as `file:line: why` and skipped. A problem that leaves the rest of a file unreadable (a JSON
    document or CSV that is not UTF-8 or not well formed) always raises.
    """
    if path.is_dir():
        yield from _dataset_rows(path)
        return
    kind = SUFFIXES.get(path.suffix.lower())
    if kind == "json":
        yield from _json_rows(path, malformed)
    elif kind == "csv":
        yield from _csv_rows(path)
    elif kind == "parquet":
        yield from _parquet_rows(path)
    else:
        yield from _jsonl_rows(path, malformed)


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every non-blank line of a JSON-lines file (whatever its suffix) as (line number, object); strict."""
    for row in _jsonl_rows(path, None):
        assert row.line is not None
        yield row.line, row.data


def read_text(path: Path) -> str:
    """A whole file as UTF-8 text; bytes that are not UTF-8 are a DataError naming their line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise data_error(path, None, f"cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise data_error(path, line, f"not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def _skip_ws(text: str, at: int) -> int:
    found = _NOT_WS.search(text, at)
    return found.start() if found else len(text)


def _skip_or_raise(malformed: list[str] | None, where: str, problem: str) -> None:
    if malformed is None:
        raise DataError(f"{where}: {problem}")
    malformed.append(f"{where}: {problem}")


def _jsonl_rows(path: Path, malformed: list[str] | None) -> Iterator[Row]:
    """Line by line from bytes, so one bad line (not UTF-8, not JSON, too deep) is only that line's problem."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise data_error(path, None, f"cannot read ({exc.strerror or exc})") from None
    index = 0
    with fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _skip_or_raise(malformed, f"{path}:{n}", f"not UTF-8 text ({exc.reason} at column {exc.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:
                _skip_or_raise(malformed, f"{path}:{n}", parse_problem(exc))
                continue
            if not isinstance(obj, dict):
                _skip_or_raise(malformed, f"{path}:{n}", f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield Row(obj, path, index, n)
            index += 1


def _json_rows(path: Path, malformed: list[str] | None) -> Iterator[Row]:
    """A JSON list is read element by element so each row keeps the line it starts on; `{"data": [...]}` too,
    by position."""
    text = read_text(path)
    start = _skip_ws(text, 0)
    if text.startswith("[", start):
        yield from _json_list(path, text, start + 1, malformed)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise data_error(path, exc.lineno, parse_problem(exc)) from None
    except (ValueError, RecursionError) as exc:
        raise data_error(path, None, parse_problem(exc)) from None
    if not (isinstance(data, dict) and isinstance(data.get("data"), list)):
        raise data_error(path, None, "expected a JSON list of objects")
    for i, obj in enumerate(data["data"]):
        if isinstance(obj, dict):
            yield Row(obj, path, i)
        else:
            _skip_or_raise(malformed, f"{path}:#{i}", f"expected a JSON object, got {type(obj).__name__}")


def _json_list(path: Path, text: str, pos: int, malformed: list[str] | None) -> Iterator[Row]:
    decoder = json.JSONDecoder()
    line, counted = 1, 0
    index = 0
    pos = _skip_ws(text, pos)
    closed = text.startswith("]", pos)
    pos += closed
    while not closed:
        pos = _skip_ws(text, pos)
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise data_error(path, exc.lineno, parse_problem(exc)) from None
        except (ValueError, RecursionError) as exc:
            raise data_error(path, line, parse_problem(exc)) from None
        if isinstance(obj, dict):
            yield Row(obj, path, index, line)
        else:
            _skip_or_raise(malformed, f"{path}:{line}", f"expected a JSON object, got {type(obj).__name__}")
        index += 1
        pos = _skip_ws(text, pos)
        if text.startswith(",", pos):
            pos += 1
            continue
        if not text.startswith("]", pos):
            raise data_error(path, text.count("\n", 0, pos) + 1, "invalid JSON (expecting ',' or ']')")
        pos += 1
        closed = True
    pos = _skip_ws(text, pos)
    if pos != len(text):
        raise data_error(path, text.count("\n", 0, pos) + 1, "invalid JSON (extra data after the list)")


def _csv_rows(path: Path) -> Iterator[Row]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    index = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise data_error(path, reader.line_num, f"invalid CSV ({exc})") from None
        yield Row({k: v for k, v in row.items() if k is not None}, path, index, reader.line_num)
        index += 1


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise data_error(path, None, f"cannot read Parquet ({exc})") from None
    for i, row in enumerate(table.to_pylist()):
        yield Row(row, path, i)


def _dataset_rows(path: Path) -> Iterator[Row]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise data_error(path, None, f"cannot load the saved dataset ({exc})") from None
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    assert isinstance(ds, Dataset)
    for i, row in enumerate(ds):
        yield Row(dict(row), path, i)


def detect_shape(columns: Iterable[str], cols: ColumnMap) -> RowShape | None:
    """The example shape a row's column names show, in order chat, instruction, prompt/completion, text."""
    names = set(columns)
    if cols.messages in names or SHAREGPT_COLUMN in names:
        return "chat"
    if cols.instruction in names and cols.output in names:
        return "instruction"
    if cols.prompt in names and cols.completion in names:
        return "prompt_completion"
    if cols.text in names:
        return "text"
    return None


def missing_columns(row: Mapping[str, Any], shape: RowShape, cols: ColumnMap) -> list[str]:
    """Columns a row lacks for a shape; a chat row may hold its messages in ShareGPT's `conversations`."""
    if shape == "chat" and SHAREGPT_COLUMN in row:
        return []
    needed = {
        "chat": [cols.messages],
        "instruction": [cols.instruction, cols.output],
        "prompt_completion": [cols.prompt, cols.completion],
        "text": [cols.text],
    }[shape]
    return [c for c in needed if c not in row]


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def to_messages(row: Mapping[str, Any], shape: RowShape, cols: ColumnMap) -> list[Message]:
    """One row to chat messages (plain text is one `text` message); ValueError says why a row does not fit."""
    try:
        return _to_messages(row, shape, cols)
    except RecursionError:
        raise ValueError("a value is nested too deeply to read") from None


def _to_messages(row: Mapping[str, Any], shape: RowShape, cols: ColumnMap) -> list[Message]:
    if shape == "chat":
        raw = row.get(cols.messages, row.get(SHAREGPT_COLUMN))
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"'{cols.messages}': {parse_problem(exc)}") from None
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


def is_empty(messages: list[Message]) -> bool:
    """True when a message other than the system one is blank, or nothing is there to learn or score."""
    if not messages or any(not m["content"] for m in messages if m["role"] != "system"):
        return True
    return not any(m["role"] in ("assistant", "text") for m in messages)
