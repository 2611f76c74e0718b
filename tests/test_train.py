"""Fine-tune jobs end to end on the tiny model with a real MLflow store."""

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from core.config import load_config
from core.registry import connect
from core.schema.job import JobConfig
from finetune.job import RUN_FILE, job_dir, run_job


def job(tmp_path: Path, tiny_base: Path, uri: str, **sections) -> JobConfig:
    data = {
        "model": {"base": str(tiny_base)},
        "data": {
            "path": "builtin:zaragoza-faq",
            "max_examples": 40,
            "max_length": 256,
            "validation_split": 0.1,
        },
        "lora": {"r": 4, "alpha": 8},
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 4,
            "batch_size": 4,
            "eval_steps": 2,
            "save_steps": 2,
            "logging_steps": 1,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
        },
        "tracking": {"tracking_uri": uri, "experiment": "t"},
        "registry": {"model_name": "tiny-faq"},
    }
    for section, values in sections.items():
        data[section].update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(JobConfig, path)


def losses(client, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, round(m.value, 5)) for m in client.get_metric_history(run_id, "train_loss")]


def test_params_over_the_length_limit_are_split_never_cut():
    from finetune.job import _params

    long_prompt = "Answer as the company's assistant. " * 200
    params = _params(JobConfig.model_validate({"data": {"system_prompt": long_prompt}}))
    parts = sorted(k for k in params if k.startswith("data.system_prompt.part"))
    assert len(parts) == 2 and "".join(params[k] for k in parts) == long_prompt
    assert all(len(v) <= 6000 for v in params.values())


# Warnings a job used to raise through its own calls (deprecated argument names, MLflow dataset logging).
FIXED_WARNINGS = (
    "`gradient_checkpointing` is deprecated",
    "`is_gradient_checkpointing` is deprecated",
    "The specified dataset source can be interpreted in multiple ways",
    "Starting with pandas version 4.0",
)


def test_job_logs_everything_and_registers_a_version(tmp_path, tiny_base, mlflow_store, recwarn):
    result = run_job(job(tmp_path, tiny_base, mlflow_store), "tiny")
    raised = {str(w.message) for w in recwarn}
    assert not [m for m in raised if any(f in m for f in FIXED_WARNINGS)]
    client = connect(mlflow_store)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "4" and run.data.params["training.max_steps"] == "4"
    assert run.data.params["data.system_prompt"] == "null" and run.data.params["lora.target_modules"] == "all-linear"
    for metric in ("train_loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second"):
        assert metric in run.data.metrics, metric
    assert len(losses(client, result.run_id)) == 4
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config", "data", "adapter", "manifest.json"} <= artifacts
    report = json.loads(Path(client.download_artifacts(result.run_id, "data/report.json")).read_text())
    assert report["train"] == 36 and report["validation"] == 4
    validation = Path(client.download_artifacts(result.run_id, "data/validation.jsonl")).read_text().splitlines()
    assert len(validation) == 4 and json.loads(validation[0])["messages"][-1]["role"] == "assistant"
    adapter = {a.path for a in client.list_artifacts(result.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter
    inputs = run.inputs.dataset_inputs
    assert sorted(i.tags[0].value for i in inputs) == ["train", "validation"]
    assert all(i.dataset.digest for i in inputs)
    mv = client.get_model_version("tiny-faq", result.version)
    assert mv.run_id == result.run_id and mv.tags["tuneops.base_model"] == str(tiny_base)
    manifest = json.loads(Path(client.download_artifacts(result.run_id, "manifest.json")).read_text())
    assert manifest["base_digest"].startswith("sha256:") and manifest["eos_token"] == "<|im_end|>"
    # the version holds the adapter and manifest; the base weights are referenced, never copied into it
    from core.registry import download_version, resolve_version

    folder = download_version(client, resolve_version(client, f"tiny-faq/{result.version}"), tmp_path / "dl")
    files = sorted(p.name for p in folder.rglob("*.safetensors"))
    assert files == ["adapter_model.safetensors"]


def test_same_seed_gives_the_same_losses(tmp_path, tiny_base, mlflow_store):
    a = run_job(job(tmp_path / "a", tiny_base, mlflow_store), "a")
    b = run_job(job(tmp_path / "b", tiny_base, mlflow_store), "b")
    c = run_job(job(tmp_path / "c", tiny_base, mlflow_store, training={"seed": 7}), "c")
    client = connect(mlflow_store)
    assert losses(client, a.run_id) == losses(client, b.run_id)
    assert losses(client, a.run_id) != losses(client, c.run_id)


def test_token_budget_job_counts_an_optimizer_step_per_row_and_logs_the_attention(
    tmp_path, tiny_base, mlflow_store, caplog
):
    """With tokens_per_batch an epoch is as many steps as the budget cuts rows (gradient_accumulation_steps=1)."""
    import logging

    from finetune.batching import budget_batches
    from finetune.job import check

    cfg = job(tmp_path, tiny_base, mlflow_store, training={"max_steps": -1, "epochs": 1, "tokens_per_batch": 700})
    checked = check(cfg)
    rows = budget_batches([len(t.input_ids) for t in checked.data.train], 700, cfg.training.seed)
    with caplog.at_level(logging.INFO, logger="finetune.attention"):
        result = run_job(cfg, "budget", checked=checked)
    steps = [step for step, _ in losses(connect(mlflow_store), result.run_id)]
    assert max(steps) == len(rows) < len(checked.data.train) / 2
    assert "attention: tuneops_packed" in caplog.text
    tag = connect(mlflow_store).get_run(result.run_id).data.tags["tuneops.attention"]
    assert tag.startswith("tuneops_packed: ")


def test_interrupted_run_is_marked_and_resume_continues_it_exactly(tmp_path, tiny_base, mlflow_store, monkeypatch):
    from finetune import callbacks

    full = run_job(job(tmp_path / "full", tiny_base, mlflow_store), "full")
    cfg = job(tmp_path / "cut", tiny_base, mlflow_store)
    original = callbacks.Progress.on_step_end

    def interrupt_after_checkpoint(self, args, state, control, **kw):
        original(self, args, state, control, **kw)
        if state.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.Progress, "on_step_end", interrupt_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, "cut")
    client = connect(mlflow_store)
    run_id = json.loads((job_dir(cfg, "cut") / RUN_FILE).read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.search_model_versions(f"run_id = '{run_id}'") == []

    monkeypatch.setattr(callbacks.Progress, "on_step_end", original)
    resumed = run_job(cfg, "cut", resume=True)
    assert resumed.run_id == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    # steps 3 and 4 after the restart match the uninterrupted run: optimizer, RNG and data position restored
    after = dict(losses(client, run_id))
    assert [after[s] for s in (3, 4)] == [dict(losses(client, full.run_id))[s] for s in (3, 4)]
    assert resumed.version is not None


def test_failed_run_is_marked_and_registers_nothing(tmp_path, tiny_base, mlflow_store, monkeypatch):
    from transformers import Trainer

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Trainer, "train", broken)
    cfg = job(tmp_path, tiny_base, mlflow_store)
    with pytest.raises(RuntimeError):
        run_job(cfg, "broken")
    client = connect(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_registered_models() == []


def test_each_run_keeps_its_own_checkpoints_and_jobs_sharing_a_folder_stay_apart(tmp_path, tiny_base, mlflow_store):
    cfg = job(tmp_path, tiny_base, mlflow_store, training={"max_steps": 2})
    first, second = run_job(cfg, "faq"), run_job(cfg, "faq")
    other = run_job(cfg, "other")
    out = cfg.training.output_dir
    assert sorted(p.name for p in (out / "faq" / "runs").iterdir()) == sorted([first.run_id, second.run_id])
    assert [p.name for p in (out / "other" / "runs").iterdir()] == [other.run_id]
    for result, name in ((first, "faq"), (second, "faq"), (other, "other")):
        assert list((out / name / "runs" / result.run_id / "checkpoints").glob("checkpoint-*"))
        assert result.bundle == out / name / "runs" / result.run_id / "final"
    # --resume continues each job's own last run
    assert json.loads((out / "faq" / RUN_FILE).read_text())["run_id"] == second.run_id
    assert json.loads((out / "other" / RUN_FILE).read_text())["run_id"] == other.run_id


def test_resume_refuses_a_run_trained_with_another_config(tmp_path, tiny_base, mlflow_store):
    from core.config import config_hash
    from core.errors import ConfigError

    cfg = job(tmp_path, tiny_base, mlflow_store)
    folder = job_dir(cfg, "faq")
    folder.mkdir(parents=True)
    (folder / RUN_FILE).write_text(json.dumps({"run_id": "a" * 32, "config_hash": "0123456789abcdef"}))
    with pytest.raises(ConfigError, match=f"config hash 0123456789abcdef, but this job resolves to {config_hash(cfg)}"):
        run_job(cfg, "faq", resume=True)
    client = connect(mlflow_store)
    experiment = client.get_experiment_by_name("t")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []


def test_resume_without_a_previous_run_is_an_error(tmp_path, tiny_base, mlflow_store):
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing to resume"):
        run_job(job(tmp_path, tiny_base, mlflow_store), "x", resume=True)


@pytest.mark.integration
def test_real_model_fine_tune_generates_through_pyfunc(tmp_path, smollm2, mlflow_store):
    cfg = job(
        tmp_path,
        smollm2.path,
        mlflow_store,
        model={"base": "smollm2-135m-instruct"},
        data={"max_examples": 24},
        training={"max_steps": 2, "eval_steps": 2, "save_steps": 2},
    )
    result = run_job(cfg, "real")
    model = mlflow.pyfunc.load_model(f"models:/tiny-faq/{result.version}")
    answer = model.predict(["What is a building permit?"], params={"max_new_tokens": 24})[0]
    assert isinstance(answer, str) and len(answer.split()) >= 3


def test_a_job_stopped_by_sigterm_is_marked_killed_and_registers_nothing(tmp_path, tiny_base, mlflow_store):
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = job(tmp_path, tiny_base, mlflow_store, training={"max_steps": 400, "save_steps": 400, "eval_steps": 400})
    cmd = [sys.executable, "-m", "tuneops", "train", str(tmp_path / "job.yaml")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True, env={**os.environ})
    run_file = job_dir(cfg, "job") / RUN_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if run_file.exists() and list(job_dir(cfg, "job").glob("runs/*/checkpoints")):
            break
        time.sleep(0.5)
    time.sleep(3)  # let the Trainer take a few steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    client = connect(mlflow_store)
    run_id = json.loads(run_file.read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED", err[-2000:]
    assert client.search_registered_models() == []


def test_compiled_decoder_layers_train_to_the_eager_losses(tmp_path, tiny_base, mlflow_store, caplog):
    """training.compile compiles each decoder layer once for every row length (dynamic shapes, the
    packed attention left eager) and trains to the same losses as eager."""
    import logging

    import torch._dynamo

    fp32 = {"dtype": "fp32", "base": str(tiny_base)}
    eager = run_job(job(tmp_path / "eager", tiny_base, mlflow_store, model=fp32), "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = job(tmp_path / "compiled", tiny_base, mlflow_store, model=fp32, training={"compile": True})
    with caplog.at_level(logging.INFO, logger="finetune.recipe"):
        compiled = run_job(cfg, "compiled")
    assert "compile: 2 decoder layers, compiled" in caplog.text
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 16, "one graph set per layer forward and backward, not one per row length"
    client = connect(mlflow_store)
    got, want = losses(client, compiled.run_id), losses(client, eager.run_id)
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-4)


def test_compile_without_a_cpp_compiler_is_refused_before_loading(tmp_path, tiny_base, mlflow_store, monkeypatch):
    """Without a toolchain inductor would fail inside the first step, after the run started; the job check names
    the field instead, and no MLflow run is made."""
    import torch

    import finetune.compiled_layers
    from core.errors import ConfigError
    from finetune.job import check

    cfg = job(tmp_path, tiny_base, mlflow_store, model={"device": "cpu"}, training={"compile": True})
    assert finetune.compiled_layers.toolchain_problem(torch.device("cpu")) is None  # this machine has one
    monkeypatch.setattr(finetune.compiled_layers, "_cpp_compiler", lambda: None)
    with pytest.raises(ConfigError, match=r"training\.compile: compiling on CPU needs a C\+\+ compiler"):
        check(cfg)
    with pytest.raises(ConfigError, match=r"training\.compile"):
        run_job(cfg, "no-compiler")
    client = connect(mlflow_store)
    experiment = client.get_experiment_by_name("t")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []
