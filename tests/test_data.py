"""Reading data in every format and shape, and the errors bad data gets."""

import csv
import json
from pathlib import Path

import pytest

from core.errors import DataError
from core.schema.data import DataConfig
from finetune.data import read_examples

QA = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(6)]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read(path: Path, **kw):
    return read_examples(DataConfig(path=path, **kw))


def test_instruction_jsonl_becomes_chat(tmp_path):
    res = read(jsonl(tmp_path / "d.jsonl", QA))
    assert res.shape == "instruction" and res.rows_read == 6
    assert res.examples[0].messages == [
        {"role": "user", "content": "Question 0?"},
        {"role": "assistant", "content": "Answer 0."},
    ]
    assert res.examples[0].source.endswith("d.jsonl:1")


def test_instruction_input_is_appended_to_the_task(tmp_path):
    res = read(jsonl(tmp_path / "d.jsonl", [{"instruction": "Sum", "input": "1 and 2", "output": "3"}]))
    assert res.examples[0].messages[0]["content"] == "Sum\n\n1 and 2"


def test_chat_messages_and_sharegpt_conversations(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]},
    ]
    res = read(jsonl(tmp_path / "c.jsonl", rows))
    assert res.shape == "chat"
    assert [e.messages[-1]["content"] for e in res.examples] == ["Hello", "Hey"]


def test_prompt_completion_csv_and_column_mapping(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["q", "a"])
        writer.writerows([["What?", "That."], ["Why?", "Because."]])
    res = read(path, shape="prompt_completion", columns={"prompt": "q", "completion": "a"})
    assert res.examples[1].messages[1]["content"] == "Because."
    assert res.examples[1].source.endswith("d.csv:3")


def test_csv_without_the_mapped_columns_names_them(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nWhat?,That.\n")
    with pytest.raises(DataError, match=r"d.csv: CSV has no column\(s\) \['prompt', 'completion'\]"):
        read(path, shape="prompt_completion")


def test_json_parquet_folder_and_saved_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.json").write_text(json.dumps(QA[:2]))
    pq.write_table(pa.Table.from_pylist(QA[2:4]), tmp_path / "dir" / "b.parquet")
    assert len(read(tmp_path / "dir").examples) == 4
    Dataset.from_list([{"text": "plain words"}]).save_to_disk(str(tmp_path / "saved"))
    res = read(tmp_path / "saved")
    assert res.shape == "text" and res.examples[0].messages == [{"role": "text", "content": "plain words"}]


def test_malformed_jsonl_lines_are_all_named(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [QA[0], "{not json", QA[1], "[1, 2]"])
    with pytest.raises(DataError) as err:
        read(path)
    assert "2 malformed row(s)" in str(err.value)
    assert "d.jsonl:2: invalid JSON" in str(err.value) and "d.jsonl:4: expected a JSON object" in str(err.value)


def test_malformed_rows_can_be_skipped_and_reported(tmp_path):
    res = read(jsonl(tmp_path / "d.jsonl", [QA[0], "{oops", QA[1]]), on_malformed="skip")
    assert len(res.examples) == 2 and res.malformed[0].endswith(
        "d.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes)"
    )


def test_empty_answers_are_dropped_with_their_line(tmp_path):
    res = read(jsonl(tmp_path / "d.jsonl", [QA[0], {"instruction": "Q", "output": "  "}]))
    assert len(res.examples) == 1 and res.empty[0].endswith("d.jsonl:2")


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no rows"):
        read(tmp_path / "empty.jsonl")


def test_all_rows_empty_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"none of the 1 rows"):
        read(jsonl(tmp_path / "d.jsonl", [{"instruction": "Q", "output": ""}]))


def test_unknown_shape_names_the_columns(tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl:1: cannot tell the example shape from columns \['foo'\]"):
        read(jsonl(tmp_path / "d.jsonl", [{"foo": 1}]))


def test_unsupported_suffix(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"has suffix '\.txt'"):
        read(tmp_path / "d.txt")


def test_builtin_organisation_data_is_available():
    res = read(Path("builtin:zaragoza-faq"))
    assert res.rows_read == 503 and res.shape == "instruction"


def test_json_list_rows_keep_the_line_they_start_on(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in QA[:3]) + ",\n  7\n]\n")
    res = read(path, on_malformed="skip")
    assert [e.source.rsplit(":", 1)[1] for e in res.examples] == ["2", "3", "4"]
    assert res.malformed == [f"{path}:5: expected a JSON object, got int"]


def test_jsonl_line_that_is_not_utf8_is_named_or_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    bad = json.dumps({"instruction": "Caf\u00e9?", "output": "Yes."}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(json.dumps(QA[0]).encode() + b"\n" + bad + b"\n" + json.dumps(QA[1]).encode() + b"\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text"):
        read(path)
    res = read(path, on_malformed="skip")
    assert len(res.examples) == 2 and res.malformed[0].startswith(f"{path}:2: not UTF-8 text")


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_whole_file_that_is_not_utf8_names_the_line(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        text = "[\n" + json.dumps(QA[0]) + ',\n{"instruction": "Caf\u00e9?", "output": "Yes."}\n]\n'
    else:
        text = "instruction,output\nQ?,A.\nCaf\u00e9?,Yes.\n"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=rf"d\{suffix}:3: not UTF-8 text"):
        read(path, on_malformed="skip")


HUGE = '{"instruction": "Q?", "output": "A.", "n": ' + "9" * 5000 + "}"
DEEP = '{"instruction": "Q?", "output": "A.", "n": ' + "[" * 5000 + "]" * 5000 + "}"


@pytest.mark.parametrize(("line", "why"), [(HUGE, "a number longer than 4300 digits"), (DEEP, "nested too deeply")])
def test_huge_numbers_and_deep_nesting_are_malformed_rows(tmp_path, line, why):
    path = jsonl(tmp_path / "d.jsonl", [QA[0], line, QA[1]])
    with pytest.raises(DataError, match=rf"d.jsonl:2: invalid JSON \({why}"):
        read(path)
    res = read(path, on_malformed="skip")
    assert len(res.examples) == 2 and res.malformed[0].startswith(f"{path}:2: invalid JSON ({why}")


@pytest.mark.parametrize(("value", "why"), [("9" * 5000, "a number longer than"), ("[" * 5000 + "]" * 5000, "nested")])
def test_huge_numbers_and_deep_nesting_in_a_json_file_name_the_line(tmp_path, value, why):
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(QA[0]) + ',\n{"instruction": "Q?", "output": ' + value + "}\n]\n")
    with pytest.raises(DataError, match=rf"d.json:3: invalid JSON \({why}"):
        read(path, on_malformed="skip")


def test_messages_held_as_a_json_string_too_deep_are_malformed(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'messages\n"[{""role"": ""user"", ""content"": ""Hi""}, {""role"": ""assistant"", ""content"": ""Yo""}]"\n'
    )
    with path.open("a") as fh:
        fh.write("[" * 5000 + "]" * 5000 + "\n")
    res = read(path, on_malformed="skip")
    assert len(res.examples) == 1 and res.malformed == [
        f"{path}:3: 'messages': invalid JSON (nested too deeply to read)"
    ]


def test_sharegpt_and_mapped_columns_read_the_same_through_core(tmp_path):
    from core.datafiles import detect_shape, iter_rows, to_messages
    from core.schema.data import ColumnMap

    path = jsonl(tmp_path / "d.jsonl", [{"q": "Hi?", "a": "Hello."}])
    cols = ColumnMap(prompt="q", completion="a")
    (row,) = iter_rows(path)
    shape = detect_shape(row.data, cols)
    assert shape == "prompt_completion" and row.where == f"{path}:1"
    assert (
        to_messages(row.data, shape, cols)
        == read(path, columns={"prompt": "q", "completion": "a"}).examples[0].messages
    )
