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
    reference = model(**batch).loss
    ours, outputs = trained_logits_loss(model, batch)
    assert outputs.logits.shape[1] == sum(sum(1 for x in r.labels if x != IGNORE) for r in rows)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
