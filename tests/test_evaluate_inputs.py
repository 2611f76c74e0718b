"""Evaluation extra files read like training data: the training job's column map applies to them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core.errors import DataError
from core.registry import VersionRef
from core.schema.evaluation import EvaluationConfig
from evaluate.job import CONFIG_ARTIFACT, VALIDATION_ARTIFACT, read_inputs


def _training_run(tmp_path: Path, columns: dict[str, str] | None) -> VersionRef:
    """A training run that logged its resolved config and a held-out split, as the fine-tune stage does."""
    import mlflow

    mlflow.set_experiment("inputs")  # not whichever experiment an earlier test left active
    with mlflow.start_run() as run:
        data = {"path": "train.csv", "columns": columns} if columns else {"path": "train.jsonl"}
        mlflow.log_text(yaml.safe_dump({"data": data}), CONFIG_ARTIFACT)
        split = {"messages": [{"role": "user", "content": "Held out?"}, {"role": "assistant", "content": "Yes."}]}
        mlflow.log_text(json.dumps(split) + "\n", VALIDATION_ARTIFACT)
    return VersionRef(name="m", version="1", run_id=run.info.run_id, source="", aliases=())


def test_extra_files_use_the_training_column_map(mlflow_store, tmp_path):
    extra = tmp_path / "faq.csv"
    extra.write_text("question,answer\nWhen?,Monday.\n")
    sharegpt = tmp_path / "chat.jsonl"
    sharegpt.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "Who?"}, {"from": "gpt", "value": "Us."}]}) + "\n"
    )
    ref = _training_run(tmp_path, {"prompt": "question", "completion": "answer"})
    cfg = EvaluationConfig(suites=["quality"], extra_files=[extra, sharegpt])
    (tmp_path / "work").mkdir()
    inputs = read_inputs(cfg, ref, tmp_path / "work")
    assert [(i.source, i.messages[-1]["content"], i.reference) for i in inputs.quality] == [
        ("validation.jsonl", "Held out?", "Yes."),
        ("faq.csv", "When?", "Monday."),
        ("chat.jsonl", "Who?", "Us."),
    ]


def test_without_a_column_map_mapped_files_fail_naming_the_line(mlflow_store, tmp_path):
    extra = tmp_path / "faq.csv"
    extra.write_text("question,answer\nWhen?,Monday.\n")
    ref = _training_run(tmp_path, None)
    (tmp_path / "work").mkdir()
    with pytest.raises(DataError, match=r"faq.csv:2: no reference answer"):
        read_inputs(EvaluationConfig(suites=["quality"], extra_files=[extra]), ref, tmp_path / "work")
