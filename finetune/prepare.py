"""Render examples with the base model's chat template, mark trained tokens, clean, split and report.

Loss is on assistant tokens (and the EOS that closes each answer) unless `train_on_prompt` is set, so the
model learns to stop where the server stops. Prepared data is cached under a key over the data digest, the
tokenizer, the template and every preparation setting, so a cache is never reused across them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError

from core.chat import Message, render, with_system
from core.errors import DataError
from core.models import cache_dir
from core.schema.data import DataConfig
from finetune.data import Example, ReadResult, read_examples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    source: str
    messages: list[Message]


@dataclass
class DataReport:
    shape: str
    files: list[str]
    rows_read: int
    kept: int
    train: int
    validation: int
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_rows: dict[str, list[str]] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    trained_tokens: int = 0
    digest: str = ""
    cache_key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v) or "none"
        t = self.tokens
        return (
            f"{self.rows_read} rows read from {len(self.files)} file(s), shape '{self.shape}'; kept {self.kept} "
            f"(train {self.train}, validation {self.validation}); dropped: {drops}; tokens per example "
            f"min {t.get('min', 0):.0f} / mean {t.get('mean', 0):.0f} / p95 {t.get('p95', 0):.0f} / "
            f"max {t.get('max', 0):.0f}; {self.trained_tokens} trained tokens"
        )


@dataclass
class Prepared:
    train: list[Tokenized]
    validation: list[Tokenized]
    report: DataReport


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, ex: Example, system_prompt: str | None, train_on_prompt: bool
) -> Tokenized:
    """Render the whole chat once and label the characters of each assistant turn through its EOS."""
    eos = tokenizer.eos_token
    if ex.messages[0]["role"] == "text":
        text = ex.messages[0]["content"] + eos
        enc = tokenizer(text, add_special_tokens=False)
        ids = list(enc["input_ids"])
        return Tokenized(ids, list(ids), ex.source, ex.messages)
    messages = with_system(ex.messages, system_prompt)
    text = render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(render(tokenizer, messages[: i + 1], add_generation_prompt=False))
        turn = text[start:end]
        cut = turn.rfind(eos)
        spans.append((start, start + cut + len(eos) if cut >= 0 else end))
    if not text.rstrip().endswith(eos) and messages[-1]["role"] == "assistant" and eos not in text[spans[-1][0] :]:
        text += eos  # the template does not close the answer: add the EOS generation stops on
        spans[-1] = (spans[-1][0], len(text))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    for tok, (a, b) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(a >= s and b <= e and b > a for s, e in spans)
        labels.append(tok if inside or train_on_prompt else IGNORE)
    return Tokenized(ids, labels, ex.source, ex.messages)


def _stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": statistics.fmean(ordered),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def cache_key(cfg: DataConfig, read: ReadResult, tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [
        read.digest,
        hashlib.sha256(vocab.encode()).hexdigest(),
        tokenizer.chat_template or "",
        tokenizer.eos_token,
        cfg.model_dump_json(exclude={"path", "validation_path"}),
        "v1",
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:20]


def prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, use_cache: bool = True) -> Prepared:
    """Read, render, clean and split; reuse a cached result only when every input to it is the same."""
    read = read_examples(cfg)
    val_read = read_examples(cfg, cfg.validation_path) if cfg.validation_path else None
    key = cache_key(cfg, read, tokenizer) + (cache_key(cfg, val_read, tokenizer)[:8] if val_read else "")
    cached = cache_dir() / "data" / f"{key}.json"
    if use_cache and cached.is_file():
        log.info("prepared data from cache %s", cached)
        return _load(cached)
    prepared = _prepare(cfg, tokenizer, read, val_read)
    prepared.report.cache_key = key
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps(
            {
                "train": [asdict(t) for t in prepared.train],
                "validation": [asdict(t) for t in prepared.validation],
                "report": prepared.report.to_dict(),
            }
        )
    )
    tmp.replace(cached)
    return prepared


def _load(path: Path) -> Prepared:
    data = json.loads(path.read_text())
    return Prepared(
        [Tokenized(**t) for t in data["train"]],
        [Tokenized(**t) for t in data["validation"]],
        DataReport(**data["report"]),
    )


def _clean(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, examples: list[Example], report: DataReport
) -> list[Tokenized]:
    seen: set[str] = set()
    kept: list[Tokenized] = []
    for ex in examples:
        fingerprint = json.dumps(ex.messages, sort_keys=True)
        if cfg.dedupe and fingerprint in seen:
            report.dropped["duplicate"] += 1
            report.dropped_rows["duplicate"].append(ex.source)
            continue
        seen.add(fingerprint)
        try:
            tok = tokenize_example(tokenizer, ex, cfg.system_prompt, cfg.train_on_prompt)
        except TemplateError as exc:
            problem = f"{ex.source}: the chat template rejects this example ({exc})"
            if cfg.on_malformed == "error":
                raise DataError(f"{problem} (set data.on_malformed=skip to drop such rows)") from None
            report.dropped["malformed"] += 1
            report.dropped_rows["malformed"].append(problem)
            continue
        if len(tok.input_ids) > cfg.max_length:
            if cfg.overlong == "drop":
                report.dropped["too_long"] += 1
                report.dropped_rows["too_long"].append(f"{ex.source} ({len(tok.input_ids)} tokens)")
                continue
            tok.input_ids = tok.input_ids[: cfg.max_length]
            tok.labels = tok.labels[: cfg.max_length]
            if all(label == IGNORE for label in tok.labels):
                report.dropped["too_long"] += 1
                report.dropped_rows["too_long"].append(f"{ex.source} (no answer left after truncation)")
                continue
        kept.append(tok)
    return kept


def _prepare(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, read: ReadResult, val_read: ReadResult | None
) -> Prepared:
    report = DataReport(
        shape=read.shape,
        files=[str(f) for f in read.files],
        rows_read=read.rows_read,
        kept=0,
        train=0,
        validation=0,
        dropped={"malformed": len(read.malformed), "empty": len(read.empty), "duplicate": 0, "too_long": 0},
        dropped_rows={"malformed": list(read.malformed), "empty": read.empty, "duplicate": [], "too_long": []},
        digest=read.digest,
    )
    kept = _clean(cfg, tokenizer, read.examples, report)
    rejected = report.dropped_rows["malformed"][len(read.malformed) :]
    if not kept and rejected:
        raise DataError(
            f"the chat template rejects {len(rejected)} of the {len(read.examples)} examples and none is left; "
            f"the first: {rejected[0]}"
        )
    if not kept:
        raise DataError(
            f"all {len(read.examples)} examples are longer than data.max_length={cfg.max_length} tokens "
            "(raise data.max_length or set data.overlong=truncate)"
        )
    random.Random(cfg.seed).shuffle(kept)
    if cfg.max_examples:
        kept = kept[: cfg.max_examples]
    if val_read is not None:
        validation = _clean(cfg, tokenizer, val_read.examples, report)
        train = kept
    else:
        n_val = round(len(kept) * cfg.validation_split)
        if cfg.validation_split > 0 and len(kept) >= 2:
            n_val = max(1, n_val)
        validation, train = kept[:n_val], kept[n_val:]
    if not train:
        raise DataError(f"no training examples left after a validation split of {cfg.validation_split}")
    report.kept = len(train) + len(validation)
    report.train, report.validation = len(train), len(validation)
    report.tokens = _stats([len(t.input_ids) for t in train + validation])
    report.trained_tokens = sum(sum(1 for x in t.labels if x != IGNORE) for t in train)
    return Prepared(train, validation, report)


def show(tokenizer: PreTrainedTokenizerBase, tok: Tokenized) -> str:
    """The example as text with trained-on spans in [[double brackets]]."""
    out: list[str] = []
    trained = False
    for tid, label in zip(tok.input_ids, tok.labels, strict=True):
        is_trained = label != IGNORE
        if is_trained != trained:
            out.append("[[" if is_trained else "]]")
            trained = is_trained
        out.append(str(tokenizer.decode([tid])))
    if trained:
        out.append("]]")
    return "".join(out)
