"""Batched teacher-forced log-likelihoods and batched greedy generation, the two things every suite needs.

Both left-pad a batch so every sequence ends at the last position: continuations then sit at the end of each
row and only the last `k` positions need logits (the 49k-wide vocabulary dominates the cost otherwise).
Position ids follow the attention mask, so padding never shifts a sequence's rotary positions.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from evaluate.merging import MergedAdapters

log = logging.getLogger(__name__)

MAX_TOKENS = 2048


@dataclass
class Subject:
    """One model measured: the version under test, the base model, or production.

    Several subjects share one base model in memory: `adapter` names the LoRA adapter to activate, None runs
    the base model with every adapter disabled. With `merged` (CPUs), the adapter is merged into the base weights
    while the subject runs and the pristine weights come back after.
    """

    label: str
    model: Any
    adapter: str | None
    tokenizer: PreTrainedTokenizerBase
    chat_template: str | None
    system_prompt: str | None
    eos_ids: list[int]
    merged: MergedAdapters | None = None

    @contextmanager
    def active(self) -> Iterator[Any]:
        if self.merged is not None:
            self.merged.use(self.adapter)
            try:
                with self.model.disable_adapter(), torch.inference_mode():  # the weights carry the adapter
                    yield self.model
            finally:
                self.merged.use(None)
            return
        has_adapters = hasattr(self.model, "disable_adapter")
        if self.adapter is None and has_adapters:
            ctx: Any = self.model.disable_adapter()
        else:
            if self.adapter is not None:
                self.model.set_adapter(self.adapter)
            ctx = nullcontext()
        with ctx, torch.inference_mode():
            yield self.model


def _left_pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _batches(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


def continuation_logprobs(
    subject: Subject,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    desc: str = "scoring",
) -> list[np.ndarray]:
    """Log-probability of each continuation token given its prompt (and the continuation before it).

    `pairs` are (prompt ids, continuation ids); a prompt holds at least one token (a chat prompt, or the
    BOS/EOS prefix token for unconditioned sentences). Returns one float64 array per pair, in input order.
    """
    for prompt, cont in pairs:
        if not prompt or not cont:
            raise ValueError("every scored pair needs a non-empty prompt and continuation")
    pad_id = subject.tokenizer.pad_token_id if subject.tokenizer.pad_token_id is not None else subject.eos_ids[0]
    rows = []
    for prompt, cont in pairs:
        keep = max(1, MAX_TOKENS - len(cont))
        rows.append((prompt[-keep:] + cont, len(cont)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[np.ndarray] = [np.empty(0)] * len(rows)
    with subject.active() as model:
        device = _device_of(model)
        for batch in tqdm(list(_batches(order, batch_size)), desc=f"{desc} [{subject.label}]", leave=False):
            inputs = _left_pad([rows[i][0] for i in batch], pad_id, device)
            k = max(rows[i][1] for i in batch)
            logits = model(**inputs, logits_to_keep=k + 1, use_cache=False).logits[:, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            targets = inputs["input_ids"][:, -k:]
            picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu().double().numpy()
            for row, i in enumerate(batch):
                n = rows[i][1]
                out[i] = picked[row, k - n :]
    return out


def generate_greedy(
    subject: Subject,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers to chat prompts (token ids ending where the answer starts), in input order."""
    tokenizer = subject.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else subject.eos_ids[0]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [""] * len(prompts)
    with subject.active() as model:
        device = _device_of(model)
        for batch in tqdm(list(_batches(order, batch_size)), desc=f"{desc} [{subject.label}]", leave=False):
            rows = [list(prompts[i])[-(MAX_TOKENS - max_new_tokens) :] for i in batch]
            inputs = _left_pad(rows, pad_id, device)
            inputs.pop("position_ids")  # generate derives them from the attention mask
            generated = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=subject.eos_ids,
                pad_token_id=pad_id,
            )
            width = inputs["input_ids"].shape[1]
            for row, i in enumerate(batch):
                out[i] = str(tokenizer.decode(generated[row, width:], skip_special_tokens=True)).strip()
    return out


def _common_prefix(rows: Sequence[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own."""
    common = min(len(r) for r in rows) - 1
    for row in rows[1:]:
        common = next((i for i in range(common) if row[i] != rows[0][i]), common)
    return max(common, 0)


def shared_prompt_logprobs(
    subject: Subject,
    prompts: Sequence[list[int]],
    continuations: Sequence[Sequence[list[int]]],
    batch_size: int,
    desc: str = "scoring",
) -> list[list[np.ndarray]]:
    """Like `continuation_logprobs` for several continuations of one prompt, running each prompt once.

    Multiple-choice items (BBQ's three answers) share a long prompt: the prompt is prefilled once, its KV
    cache is repeated per continuation, and the right-padded continuations are scored on top of it. The start
    every prompt has in common (the chat template's system turn, ~30 tokens) is prefilled once for the whole
    call; each batch's prompts continue from a copy of that cache, left-padded after it.
    """
    tokenizer = subject.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else subject.eos_ids[0]
    rows = [list(p)[-(MAX_TOKENS // 2) :] for p in prompts]
    if not rows:
        return []
    if any(not r for r in rows):
        raise ValueError("every scored prompt needs at least one token")
    common = _common_prefix(rows)
    order = sorted(range(len(prompts)), key=lambda i: -len(rows[i]))
    out: list[list[np.ndarray]] = [[] for _ in prompts]
    with subject.active() as model:
        device = _device_of(model)
        shared = None
        if common:
            shared = model(input_ids=torch.tensor([rows[0][:common]], device=device), use_cache=True).cache
        for batch in tqdm(list(_batches(order, batch_size)), desc=f"{desc} [{subject.label}]", leave=False):
            inputs = _left_pad([rows[i][common:] for i in batch], pad_id, device)
            cache = None
            if shared is not None:
                cache = copy.deepcopy(shared)
                cache.reorder_cache(torch.zeros(len(batch), dtype=torch.long, device=device))
                ones = torch.ones((len(batch), common), dtype=torch.long, device=device)
                inputs["attention_mask"] = torch.cat([ones, inputs["attention_mask"]], dim=1)
                inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1)[:, common:]
            prefill = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(prefill.logits[:, -1].float(), dim=-1)
            flat = [(b, list(c)) for b, i in enumerate(batch) for c in continuations[i]]
            if any(not c for _, c in flat):
                raise ValueError("every scored continuation needs at least one token")
            owner = torch.tensor([b for b, _ in flat], device=device)
            cache = prefill.cache
            cache.reorder_cache(owner)
            width = max(len(c) for _, c in flat)
            ids = torch.full((len(flat), width), pad_id, dtype=torch.long, device=device)
            mask = torch.zeros((len(flat), width), dtype=torch.long, device=device)
            for r, (_, c) in enumerate(flat):
                ids[r, : len(c)] = torch.tensor(c, device=device)
                mask[r, : len(c)] = 1
            full_mask = torch.cat([inputs["attention_mask"][owner], mask], dim=1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
            logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, cache=cache).logits.float()
            rest = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            head = first[owner].gather(-1, ids[:, :1]).squeeze(-1)
            scores = torch.cat([head.unsqueeze(-1), rest], dim=1).cpu().double().numpy()
            for r, (b, c) in enumerate(flat):
                out[batch[b]].append(scores[r, : len(c)])
    return out
