"""Offline batch inference: a JSONL file of prompts or chats answered by one registered version.

It runs the gateway's own batching engine in-process (no HTTP), so answers are the gateway's: the same chat
rendering, EOS handling and sampling. Every answer is appended to the output as soon as it finishes; a stopped
job started again keeps the rows already answered and does only the rest. When all rows are answered the file
is rewritten in input order. The MLflow run records the version, the input's digest and the throughput.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DataError, TuneopsError
from core.registry import connect, resolve_version

log = logging.getLogger(__name__)

EXPERIMENT = "tuneops-predict"
INDEX = "index"  # the input row's position (from 0), kept in every output row
OUTPUT = "output"


@dataclass(frozen=True)
class PredictOptions:
    """How to generate: what the gateway's request fields would say, plus the batch and device."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class PredictReport:
    """What one invocation did; the run's metrics."""

    rows: int
    skipped: int
    answered: int = 0
    failed: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    run_id: str | None = None
    version: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Input rows: objects with `messages` (a chat) or `prompt` (text); other fields are carried through."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected an object with 'messages' or 'prompt'")
            messages, prompt = row.get("messages"), row.get("prompt")
            chat = isinstance(messages, list) and bool(messages) and all(_is_message(m) for m in messages)
            if not chat and not (isinstance(prompt, str) and prompt):
                raise DataError(
                    f"{path}:{line_no}: needs 'messages' (a list of {{role, content}}) or a non-empty 'prompt'"
                )
            if INDEX in row or OUTPUT in row:
                raise DataError(f"{path}:{line_no}: '{INDEX}' and '{OUTPUT}' are written by predict")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def answered_rows(path: Path, total: int) -> dict[int, dict[str, Any]]:
    """Rows a previous invocation answered (a torn last line is ignored); failed rows are done again."""
    done: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            index = row.get(INDEX) if isinstance(row, dict) else None
            if isinstance(index, int) and 0 <= index < total and "error" not in row:
                done[index] = row
    return done


class BatchGenerator:
    """One version on the gateway's engine, fed from this thread instead of HTTP requests."""

    def __init__(self, opened: Any, options: PredictOptions) -> None:
        from core.device import choose_device, choose_dtype
        from serve.engine import Engine
        from serve.metrics import Metrics

        self.opened = opened
        self.options = options
        device = choose_device(options.device)  # type: ignore[arg-type]
        dtype = choose_dtype(options.dtype, device)  # type: ignore[arg-type]
        self.engine = Engine(
            max_batch=options.batch_size,
            max_queue=options.batch_size * 2,
            queue_timeout_s=24 * 3600.0,
            metrics=Metrics(),
        )
        self.engine.start()
        self.tokenizer = opened.tokenizer()
        self.eos_ids = frozenset(opened.eos_ids(self.tokenizer))
        try:
            self.engine.call(
                lambda: self.engine.load_base(opened.load_base(device, dtype).eval(), self.tokenizer, device)
            ).result()
            self.engine.call(lambda: self.engine.add_adapter("version", opened.adapter_path)).result()
        except BaseException:
            self.engine.stop()
            raise
        config = self.engine.base.config
        self.max_model_len = int(getattr(config, "max_position_embeddings", 2048))

    def close(self) -> None:
        self.engine.stop()

    def prompt_ids(self, row: dict[str, Any]) -> list[int]:
        from core.chat import prompt_ids

        if "messages" in row:
            manifest = self.opened.manifest
            return prompt_ids(self.tokenizer, row["messages"], manifest.chat_template, manifest.system_prompt)
        return list(self.tokenizer(row["prompt"], add_special_tokens=True)["input_ids"])

    def run(self, rows: Iterator[tuple[int, dict[str, Any]]], emit: Callable[[int, dict[str, Any]], None]) -> None:
        """Answer every (index, row); `emit(index, result)` is called on this thread as each one finishes."""
        from serve.engine import Failed, Finished, Job, SamplingParams, TextDelta

        events: queue.Queue[tuple[int, Any]] = queue.Queue()
        texts: dict[int, list[str]] = {}
        in_flight = 0
        window = self.options.batch_size * 2
        pending = iter(rows)
        exhausted = False
        while True:
            while not exhausted and in_flight < window:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    break
                index, row = item
                try:
                    ids = self.prompt_ids(row)
                    room = self.max_model_len - len(ids)
                    if room < 1:
                        raise TuneopsError(f"the prompt has {len(ids)} tokens; the context holds {self.max_model_len}")
                    params = SamplingParams(
                        max_tokens=min(self.options.max_tokens, room),
                        temperature=self.options.temperature,
                        top_p=self.options.top_p,
                        seed=self.options.seed,
                    )
                    job = Job("version", ids, params, self.eos_ids, functools.partial(_put, events, index))
                    self.engine.submit(job, retry_after_s=1)
                except Exception as exc:  # one bad row is reported in its output row, the rest go on
                    emit(index, {"error": str(exc)})
                    continue
                texts[index] = []
                in_flight += 1
            if in_flight == 0:
                return
            index, event = events.get()
            if isinstance(event, TextDelta):
                texts[index].append(event.text)
            elif isinstance(event, Finished):
                text = "".join(texts.pop(index)) + event.text
                emit(index, {OUTPUT: text, "finish_reason": event.reason, "completion_tokens": event.completion_tokens})
                in_flight -= 1
            elif isinstance(event, Failed):
                texts.pop(index, None)
                emit(index, {"error": event.error.message})
                in_flight -= 1


def _put(events: queue.Queue[tuple[int, Any]], index: int, event: Any) -> None:
    events.put((index, event))


def predict(
    model: str,
    input_path: Path,
    output_path: Path,
    options: PredictOptions,
    tracking_uri: str | None = None,
    progress: bool = True,
) -> PredictReport:
    """Answer every input row not already in the output; log a run with the version, digest and throughput."""
    import mlflow
    from tqdm.auto import tqdm

    from core.version import open_version

    rows = read_rows(input_path)
    digest = file_digest(input_path)
    done = answered_rows(output_path, len(rows))
    report = PredictReport(rows=len(rows), skipped=len(done))
    client = connect(tracking_uri)
    ref = resolve_version(client, model)
    report.version = ref.label
    todo = [(i, row) for i, row in enumerate(rows) if i not in done]
    if todo:
        with tempfile.TemporaryDirectory(prefix="tuneops-predict-") as tmp:
            opened = open_version(client, ref, Path(tmp))
            generator = BatchGenerator(opened, options)
            try:
                report = _generate(generator, todo, rows, output_path, report, progress, tqdm)
            finally:
                generator.close()
    if len(answered_rows(output_path, len(rows))) == len(rows):
        _rewrite_in_order(output_path, len(rows))

    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"predict {ref.label}") as run:
        report.run_id = run.info.run_id
        mlflow.set_tags(
            {"tuneops.model_name": ref.name, "tuneops.model_version": ref.version, "tuneops.kind": "predict"}
        )
        mlflow.log_params(
            {
                "model": model,
                "model_version": ref.label,
                "model_run_id": ref.run_id,
                "input": str(input_path),
                "input_sha256": digest,
                "output": str(output_path),
                **vars(options),
            }
        )
        mlflow.log_metrics(
            {
                "rows": report.rows,
                "rows_skipped": report.skipped,
                "rows_answered": report.answered,
                "rows_failed": report.failed,
                "completion_tokens": report.completion_tokens,
                "seconds": report.seconds,
                "tokens_per_s": report.tokens_per_s,
                "rows_per_s": report.rows_per_s,
            }
        )
    return report


def _generate(
    generator: BatchGenerator,
    todo: list[tuple[int, dict[str, Any]]],
    rows: list[dict[str, Any]],
    output_path: Path,
    report: PredictReport,
    progress: bool,
    tqdm: Any,
) -> PredictReport:
    output_path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(output_path)
    bar = tqdm(total=len(rows), initial=report.skipped, unit="row", desc="predict", disable=not progress)
    start = time.perf_counter()
    with open(output_path, "a", encoding="utf-8") as out:

        def emit(index: int, result: dict[str, Any]) -> None:
            out.write(json.dumps({INDEX: index, **rows[index], **result}, ensure_ascii=False) + "\n")
            out.flush()  # what is written survives a stop
            if "error" in result:
                report.failed += 1
                report.failures.append(f"row {index}: {result['error']}")
            else:
                report.answered += 1
                report.completion_tokens += int(result["completion_tokens"])
            bar.update(1)

        try:
            generator.run(iter(todo), emit)
        finally:
            report.seconds = time.perf_counter() - start
            bar.close()
    return report


def _drop_torn_tail(path: Path) -> None:
    """A stop in the middle of a write leaves a partial last line: cut it so appended rows start clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _rewrite_in_order(path: Path, total: int) -> None:
    """Once every row is answered: one row per input row, in input order (atomic replace)."""
    done = answered_rows(path, total)
    tmp = path.with_name(path.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for index in range(total):
            f.write(json.dumps(done[index], ensure_ascii=False) + "\n")
    tmp.replace(path)
