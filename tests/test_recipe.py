"""The training recipe's pieces against the reference behaviour of transformers."""

import torch

from core.models import load_causal_lm, load_tokenizer
from finetune.prepare import IGNORE, Tokenized
from finetune.recipe import trained_logits_loss


def test_trained_logits_loss_equals_the_full_logits_loss_on_a_packed_row(tiny_base):
    from transformers import DataCollatorWithFlattening

    model = load_causal_lm(tiny_base, torch.device("cpu"), torch.float32)
    tok = load_tokenizer(tiny_base)
    rows = []
    for text, answer in [("Question one?", "Yes."), ("Another question here?", "No, not at all.")]:
        p = tok(text, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(Tokenized(p + a, [IGNORE] * len(p) + a, "x", []))
    batch = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(
        [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    )
    batch = {k: torch.as_tensor(v) for k, v in batch.items()}
    reference = model(**batch, use_cache=False).loss
    ours, outputs = trained_logits_loss(model, batch)
    assert outputs.logits.shape[1] == sum(sum(1 for x in r.labels if x != IGNORE) for r in rows)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def _rows(tok, pairs):
    rows = []
    for text, answer in pairs:
        p = tok(text, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(Tokenized(p + a, [IGNORE] * len(p) + a, "x", []))
    return rows


def _packed(rows):
    from transformers import DataCollatorWithFlattening

    batch = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(
        [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    )
    return {k: torch.as_tensor(v) for k, v in batch.items()}


def test_no_attention_crosses_packed_examples(tiny_base):
    """Each example's trained logits inside a packed row equal its logits alone; a leak changes the later ones."""
    model = load_causal_lm(tiny_base, torch.device("cpu"), torch.float32).eval()
    rows = _rows(
        load_tokenizer(tiny_base),
        [
            ("What is a permit?", "A written approval."),
            ("Is a carport a building?", "Yes, when it has a roof."),
            ("Who inspects?", "The city."),
        ],
    )
    with torch.no_grad():
        alone = [trained_logits_loss(model, _packed([r]))[1].logits[0] for r in rows]
        packed = trained_logits_loss(model, _packed(rows))[1].logits[0]
        # The same row read as one sequence (a cache makes transformers ignore the boundaries): later rows differ.
        batch = _packed(rows)
        keep = (batch["labels"][0, 1:] != IGNORE).nonzero().squeeze(-1)
        leaked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=keep)
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-4, atol=1e-4)
    tail = len(alone[-1])
    assert not torch.allclose(leaked.logits[0][-tail:], alone[-1], atol=1e-3)
