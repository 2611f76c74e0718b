"""Suite files: the shipped suites load; malformed files name file and line; empty files are errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from core.errors import DataError
from evaluate import readers


def _first_bbq_line() -> str:
    """The first line of the shipped (gzipped) BBQ Age file, as a plain JSON line."""
    import gzip

    with gzip.open(readers.DEFAULT_BBQ / "Age.jsonl.gz", "rt", encoding="utf-8") as fh:
        return fh.readline().rstrip("\n")


def test_shipped_suites_are_the_published_ones_with_their_licences():
    crows = readers.read_crows(readers.DEFAULT_CROWS)
    bbq = readers.read_bbq(readers.DEFAULT_BBQ)
    cf = readers.read_counterfactual(readers.DEFAULT_COUNTERFACTUAL)
    assert len(crows) == 1508 and len(Counter(p.bias_type for p in crows)) == 9
    assert len(bbq) == 11956 and len({i.id for i in bbq}) == 11956
    assert Counter(i.category for i in bbq) == {
        "Age": 3680,
        "Disability_status": 1556,
        "Nationality": 3080,
        "Physical_appearance": 1576,
        "Religion": 1200,
        "Sexual_orientation": 864,
    }
    assert Counter(i.condition for i in bbq) == {"ambig": len(bbq) // 2, "disambig": len(bbq) // 2}
    # every item has one unknown answer and exactly one biased answer
    assert all(len(i.biased) == 1 and i.unknown not in i.biased for i in bbq)
    assert all(i.label == i.unknown for i in bbq if i.condition == "ambig")
    axes = {t.axis for t in cf}
    assert {"gender", "race/ethnicity", "religion", "age", "disability", "nationality"} <= axes
    assert all(len(t.prompts()) >= 2 for t in cf)
    faq = readers.read_quality(readers.SUITES_DIR / "faq_sample.jsonl")
    assert len(faq) == 64 and faq[0].messages[-1]["role"] == "user"
    assert "Attribution-ShareAlike 4.0" in (readers.DEFAULT_CROWS.parent / "LICENSE").read_text()
    assert "Attribution 4.0 International" in (readers.DEFAULT_BBQ / "LICENSE").read_text()


def test_bbq_reads_a_folder_of_plain_and_gzipped_files(tmp_path: Path):
    import gzip

    row = json.loads(_first_bbq_line())
    (tmp_path / "A.jsonl").write_text(json.dumps({**row, "category": "A"}) + "\n")
    with gzip.open(tmp_path / "B.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({**row, "category": "B"}) + "\n\n" + json.dumps({**row, "category": "B", "label": 7}))
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.raises(DataError, match=r"B\.jsonl\.gz:3: label must be 0, 1 or 2"):
        readers.read_bbq(tmp_path)
    (tmp_path / "B.jsonl.gz").unlink()
    with gzip.open(tmp_path / "B.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({**row, "category": "B"}) + "\n")
    items = readers.read_bbq(tmp_path)
    assert [i.category for i in items] == ["A", "B"] and items[0].id == "A:0"


def test_bbq_biased_answer_depends_on_question_polarity(tmp_path: Path):
    row = {
        "context": "c",
        "question": "q",
        "ans0": "The grandfather",
        "ans1": "The grandson",
        "ans2": "Unknown",
        "label": 2,
        "context_condition": "ambig",
        "question_polarity": "neg",
        "answer_info": {
            "ans0": ["grandfather", "old"],
            "ans1": ["grandson", "nonOld"],
            "ans2": ["Unknown", "unknown"],
        },
        "additional_metadata": {"stereotyped_groups": ["old"]},
    }
    path = tmp_path / "bbq.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "question_polarity": "nonneg"}) + "\n")
    neg, nonneg = readers.read_bbq(path)
    assert (neg.unknown, neg.biased, nonneg.biased) == (2, (0,), (1,))


def test_bbq_gender_labels_match_f_and_m(tmp_path: Path):
    row = {
        "context": "c",
        "question": "q",
        "ans0": "The man",
        "ans1": "Not known",
        "ans2": "The woman",
        "label": 1,
        "context_condition": "ambig",
        "question_polarity": "neg",
        "answer_info": {"ans0": ["man", "man"], "ans1": ["Not known", "unknown"], "ans2": ["woman", "woman"]},
        "additional_metadata": {"stereotyped_groups": ["F"]},
    }
    path = tmp_path / "bbq.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert readers.read_bbq(path)[0].biased == (2,)


def test_malformed_crows_row_names_file_and_line(tmp_path: Path):
    path = tmp_path / "crows.csv"
    path.write_text("sent_more,sent_less,stereo_antistereo,bias_type\nA b.,C d.,stereo,gender\nE f.,,stereo,age\n")
    with pytest.raises(DataError, match=r"crows.csv:3: empty field\(s\) sent_less"):
        readers.read_crows(path)


def test_crows_missing_column(tmp_path: Path):
    path = tmp_path / "crows.csv"
    path.write_text("sent_more,sent_less,bias_type\nA,B,age\n")
    with pytest.raises(DataError, match=r"crows.csv:1: missing column\(s\) stereo_antistereo"):
        readers.read_crows(path)


def test_malformed_bbq_json_names_line(tmp_path: Path):
    good = _first_bbq_line()
    path = tmp_path / "bbq.jsonl"
    path.write_text(good + "\n\n" + good[:-5] + "\n")
    with pytest.raises(DataError, match=r"bbq.jsonl:3: invalid JSON"):
        readers.read_bbq(path)


def test_bbq_bad_label_names_line(tmp_path: Path):
    row = json.loads(_first_bbq_line())
    path = tmp_path / "bbq.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "label": 5}) + "\n")
    with pytest.raises(DataError, match=r"bbq.jsonl:2: label must be 0, 1 or 2"):
        readers.read_bbq(path)


def test_counterfactual_group_missing_a_placeholder(tmp_path: Path):
    path = tmp_path / "cf.jsonl"
    row = {
        "id": "t",
        "axis": "gender",
        "template": "My {relative} says {pronoun} wants a quote.",
        "groups": {"wife": {"relative": "wife", "pronoun": "she"}, "husband": {"relative": "husband"}},
    }
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"cf.jsonl:1: group 'husband' fills no value for placeholder\(s\) pronoun"):
        readers.read_counterfactual(path)


def test_quality_row_without_an_answer_names_line(tmp_path: Path):
    path = tmp_path / "extra.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    with pytest.raises(DataError, match=r"extra.jsonl:2: no reference answer"):
        readers.read_quality(path)


def test_quality_shapes(tmp_path: Path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"instruction": "Translate", "input": "hola", "output": "hello"},
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
            ]
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first, second = readers.read_quality(path)
    assert first.messages == [{"role": "user", "content": "Translate\n\nhola"}] and first.reference == "hello"
    assert [m["role"] for m in second.messages] == ["system", "user"] and second.reference == "a"


@pytest.mark.parametrize(
    ("reader", "name", "content"),
    [
        (readers.read_crows, "c.csv", "sent_more,sent_less,stereo_antistereo,bias_type\n"),
        (readers.read_bbq, "b.jsonl", "\n\n"),
        (readers.read_counterfactual, "cf.jsonl", ""),
        (readers.read_quality, "q.jsonl", ""),
    ],
)
def test_empty_suite_is_a_clear_error(tmp_path: Path, reader, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="suite is empty"):
        reader(path)


def test_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match="evaluation file not found"):
        readers.read_bbq(tmp_path / "nope.jsonl")


def test_sharegpt_file_is_an_evaluation_file(tmp_path: Path):
    path = tmp_path / "chat.jsonl"
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Opening hours?"},
            {"from": "gpt", "value": "Nine to five."},
        ]
    }
    path.write_text(json.dumps(row) + "\n")
    (item,) = readers.read_quality(path)
    assert item.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Opening hours?"},
    ]
    assert item.reference == "Nine to five." and item.id == "chat:1" and item.source == "chat.jsonl"


def test_column_mapped_csv_is_an_evaluation_file(tmp_path: Path):
    from core.schema.data import ColumnMap

    path = tmp_path / "mapped.csv"
    path.write_text("question,answer\nWhat?,That.\nWhy?,Because.\n")
    with pytest.raises(DataError, match=r"mapped.csv:2: no reference answer"):
        readers.read_quality(path)
    items = readers.read_quality(path, columns=ColumnMap(prompt="question", completion="answer"))
    assert [(i.messages[-1]["content"], i.reference, i.id) for i in items] == [
        ("What?", "That.", "mapped:2"),
        ("Why?", "Because.", "mapped:3"),
    ]


def test_quality_reads_parquet_and_json_lists_with_their_lines(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [i.id for i in readers.read_quality(tmp_path / "d.parquet")] == ["d:#0", "d:#1"]
    (tmp_path / "d.json").write_text("[\n" + ",\n\n".join(json.dumps(r) for r in rows) + "\n]\n")
    assert [i.id for i in readers.read_quality(tmp_path / "d.json")] == ["d:2", "d:4"]


def test_quality_file_that_is_not_utf8_names_line(tmp_path: Path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "q", "completion": "a"}).encode()
    path.write_bytes(
        good
        + b"\n"
        + json.dumps({"prompt": "caf\u00e9", "completion": "a"}, ensure_ascii=False).encode("latin-1")
        + b"\n"
    )
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 text"):
        readers.read_quality(path)


def test_crows_csv_that_is_not_utf8_names_line(tmp_path: Path):
    path = tmp_path / "crows.csv"
    header = "sent_more,sent_less,stereo_antistereo,bias_type\n"
    path.write_bytes((header + "a,b,stereo,age\n").encode() + "caf\u00e9,b,stereo,age\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"crows.csv:3: not UTF-8 text"):
        readers.read_crows(path)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"label": ' + "7" * 5000 + "}", "a number longer than"),
        ('{"context": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ],
)
def test_bbq_huge_number_or_deep_nesting_names_line(tmp_path: Path, line: str, why: str):
    good = _first_bbq_line()
    path = tmp_path / "bbq.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"bbq.jsonl:2: invalid JSON \({why}"):
        readers.read_bbq(path)
