"""Rendering, loss masks, EOS, cleaning, splitting and the preparation cache."""

import json
from pathlib import Path

import pytest

from core.errors import DataError
from core.models import load_tokenizer
from core.schema.data import DataConfig
from finetune.prepare import IGNORE, prepare, show


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEOPS_CACHE", str(tmp_path / "cache"))


def data(tmp_path: Path, rows: list[dict], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"instruction": f"Question number {i}?", "output": f"Answer number {i}."} for i in range(10)]


def test_loss_only_on_the_answer_and_its_eos(tmp_path, tokenizer):
    p = prepare(DataConfig(path=data(tmp_path, ROWS), validation_split=0), tokenizer)
    ex = p.train[0]
    trained = tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])
    answer = ex.messages[-1]["content"]
    assert trained == answer + tokenizer.eos_token
    assert ex.input_ids[-2] == tokenizer.eos_token_id or ex.input_ids[-1] == tokenizer.eos_token_id
    assert show(tokenizer, ex).endswith(f"[[{answer}{tokenizer.eos_token}]]\n")


def test_train_on_prompt_labels_everything(tmp_path, tokenizer):
    p = prepare(DataConfig(path=data(tmp_path, ROWS), validation_split=0, train_on_prompt=True), tokenizer)
    assert all(lab != IGNORE for lab in p.train[0].labels)


def test_system_prompt_is_rendered(tmp_path, tokenizer):
    p = prepare(DataConfig(path=data(tmp_path, ROWS), system_prompt="Be brief.", validation_split=0), tokenizer)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tokenizer.decode(p.train[0].input_ids)


def test_multi_turn_chat_trains_every_assistant_turn(tmp_path, tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "A?"},
            {"role": "assistant", "content": "One."},
            {"role": "user", "content": "B?"},
            {"role": "assistant", "content": "Two."},
        ]
    }
    p = prepare(DataConfig(path=data(tmp_path, [row]), validation_split=0), tokenizer)
    ex = p.train[0]
    trained = tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])
    assert trained == f"One.{tokenizer.eos_token}Two.{tokenizer.eos_token}"


def test_plain_text_ends_with_eos(tmp_path, tokenizer):
    p = prepare(DataConfig(path=data(tmp_path, [{"text": "Some words."}]), validation_split=0), tokenizer)
    assert p.train[0].input_ids[-1] == tokenizer.eos_token_id


def test_duplicates_and_overlong_rows_are_dropped_and_reported(tmp_path, tokenizer):
    long = {"instruction": "Long?", "output": "word " * 400}
    p = prepare(DataConfig(path=data(tmp_path, [*ROWS, ROWS[0], long]), validation_split=0, max_length=128), tokenizer)
    assert p.report.dropped["duplicate"] == 1 and p.report.dropped_rows["duplicate"][0].endswith("d.jsonl:11")
    assert p.report.dropped["too_long"] == 1 and "d.jsonl:12" in p.report.dropped_rows["too_long"][0]
    assert p.report.kept == 10


def test_overlong_rows_can_be_truncated(tmp_path, tokenizer):
    long = {"instruction": "Long?", "output": "word " * 400}
    p = prepare(
        DataConfig(path=data(tmp_path, [long]), validation_split=0, max_length=64, overlong="truncate"),
        tokenizer,
    )
    assert len(p.train[0].input_ids) == 64


def test_all_examples_too_long_is_an_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"all 10 examples are longer than data\.max_length=16"):
        prepare(DataConfig(path=data(tmp_path, ROWS), max_length=16), tokenizer)


def test_split_is_seeded_and_reported(tmp_path, tokenizer):
    cfg = DataConfig(path=data(tmp_path, ROWS), validation_split=0.2, seed=7)
    a = prepare(cfg, tokenizer, use_cache=False)
    b = prepare(cfg, tokenizer, use_cache=False)
    assert [t.source for t in a.validation] == [t.source for t in b.validation]
    assert (a.report.train, a.report.validation) == (8, 2)
    assert a.report.tokens["max"] >= a.report.tokens["mean"] >= a.report.tokens["min"] > 0


def test_cache_is_reused_only_for_the_same_inputs(tmp_path, tokenizer, tiny_base):
    path = data(tmp_path, ROWS)
    first = prepare(DataConfig(path=path), tokenizer)
    again = prepare(DataConfig(path=path), tokenizer)
    assert again.report.cache_key == first.report.cache_key
    other_setting = prepare(DataConfig(path=path, max_length=300), tokenizer)
    assert other_setting.report.cache_key != first.report.cache_key
    tok2 = load_tokenizer(tiny_base)
    tok2.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    other_template = prepare(DataConfig(path=path), tok2)
    assert other_template.report.cache_key != first.report.cache_key
    path.write_text(path.read_text() + json.dumps({"instruction": "New?", "output": "Yes."}) + "\n")
    assert prepare(DataConfig(path=path), tokenizer).report.cache_key != first.report.cache_key


def test_cache_sees_changes_inside_a_saved_dataset_folder(tmp_path, tokenizer):
    from datasets import Dataset

    folder = tmp_path / "saved"
    Dataset.from_list(ROWS[:4]).save_to_disk(str(folder))
    first = prepare(DataConfig(path=folder, validation_split=0), tokenizer)
    Dataset.from_list(ROWS[4:8]).save_to_disk(str(tmp_path / "other"))
    import shutil

    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "other", folder)
    second = prepare(DataConfig(path=folder, validation_split=0), tokenizer)
    assert second.report.cache_key != first.report.cache_key
    assert [t.messages for t in second.train] != [t.messages for t in first.train]


STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TWO_USERS = {
    "messages": [
        {"role": "user", "content": "A?"},
        {"role": "user", "content": "B?"},
        {"role": "assistant", "content": "Both."},
    ]
}


CHATS = [
    {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
    for r in ROWS
]


@pytest.fixture
def strict_tokenizer(smollm2_tokenizer):
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = STRICT_TEMPLATE
    return tok


def test_a_row_the_chat_template_rejects_names_its_line(tmp_path, strict_tokenizer):
    path = data(tmp_path, [*CHATS[:3], TWO_USERS, CHATS[3]])
    with pytest.raises(DataError, match=r"d\.jsonl:4: the chat template rejects this example \(Conversation roles"):
        prepare(DataConfig(path=path, validation_split=0), strict_tokenizer)


def test_rows_the_chat_template_rejects_can_be_skipped_and_reported(tmp_path, strict_tokenizer):
    path = data(tmp_path, [*CHATS[:3], TWO_USERS, CHATS[3]])
    p = prepare(DataConfig(path=path, validation_split=0, on_malformed="skip"), strict_tokenizer)
    assert p.report.kept == 4 and p.report.dropped["malformed"] == 1
    assert p.report.dropped_rows["malformed"][0].startswith(f"{path}:4: the chat template rejects this example")
    with pytest.raises(DataError, match=r"the chat template rejects 1 of the 1 examples and none is left"):
        prepare(DataConfig(path=data(tmp_path, [TWO_USERS], "only.jsonl"), on_malformed="skip"), strict_tokenizer)
