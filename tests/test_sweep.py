"""`tuneops sweep`: the sweep section's validation, and searches on the tiny model with a real MLflow store.

The PostgreSQL test runs two worker processes against one study in PostgreSQL, beside the session's
PostgreSQL-backed MLflow server (tests/conftest.py); it is skipped only where PostgreSQL cannot be installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import optuna
import pytest
import yaml

from core.config import load_config
from core.errors import ConfigError
from core.registry import CANDIDATE, PRODUCTION, connect, current_alias
from core.schema.job import JobConfig
from core.schema.sweep import DIRECTIONS, Objective
from tuneops.cli import run

ROOT = Path(__file__).resolve().parents[1]


def sweep_job(tmp_path: Path, tiny_base: Path, uri: str, sweep: dict[str, Any], **sections: dict[str, Any]) -> Path:
    data: dict[str, Any] = {
        "model": {"base": str(tiny_base)},
        "data": {"path": "builtin:zaragoza-faq", "max_examples": 20, "max_length": 192, "validation_split": 0.2},
        "lora": {"r": 4, "alpha": 8},
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 2,
            "batch_size": 4,
            "eval_steps": 1,
            "save_steps": 2,
            "logging_steps": 1,
            "warmup_ratio": 0.0,
        },
        "tracking": {"tracking_uri": uri, "experiment": "sweeps"},
        "registry": {"model_name": "swept"},
        "sweep": {
            "params": {"training.learning_rate": "log_uniform(1e-4, 1e-2)", "lora.r": "choice([2, 4, 8])"},
            "n_trials": 4,
            **sweep,
        },
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def runs_of(client, experiment: str = "sweeps") -> tuple[Any, list[Any]]:
    """The study's parent run and its child runs, oldest first."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags and "tuneops.sweep.trial" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    return parents[0], trials


def study_of(tmp_path: Path, name: str = "job") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'out' / 'sweep' / 'optuna.db'}")


# --- validation: every problem names its line, before anything trains -------------------------------------


def problems(tmp_path: Path, sweep: str, extra: str = "") -> list[str]:
    path = tmp_path / "job.yaml"
    path.write_text(f"model:\n  base: x\n{extra}sweep:\n{sweep}")
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path)
    return err.value.problems


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        (
            "  params:\n    lora.r: int(2, 8)\n  trials: 4\n",
            "sweep.trials (line 6): unknown key; did you mean 'n_trials'?",
        ),
        (
            "  params:\n    lora.rank: int(2, 8)\n",
            "sweep.params.lora.rank (line 5): 'lora.rank' is not a config key; did you mean 'lora.r'?",
        ),
        (
            "  params:\n    lora.r: int(2, 8)\n    training.output_dir: choice([a, b])\n",
            "sweep.params.training.output_dir (line 6): 'training.output_dir' cannot be searched: it is bookkeeping",
        ),
        (
            "  params:\n    data.max_length: int(64, 128)\n",
            "sweep.params.data.max_length (line 5): 'data.max_length' cannot be searched: it is not a lora.* or",
        ),
        (
            "  params:\n    lora.alpha: uniform(4, 16)\n",
            "sweep.params.lora.alpha (line 5): 'lora.alpha' is an integer, so uniform(...) does not fit: use int(a, b)",
        ),
        (
            "  params:\n    lora.bias: int(1, 2)\n",
            "sweep.params.lora.bias (line 5): 'lora.bias' is one of a set of values, so int(...) does not fit: use "
            "choice([...])",
        ),
        (
            "  params:\n    lora.target_modules: choice([[q_proj, v_proj], every-linear])\n",
            "sweep.params.lora.target_modules (line 5): 'every-linear' is not a valid lora.target_modules",
        ),
        (
            "  params:\n    lora.r: choice([8, 1.5])\n",
            "sweep.params.lora.r (line 5): 1.5 is not a valid lora.r",
        ),
        (
            "  params:\n    lora.dropout: uniform(0.1, 1.5)\n",
            "sweep.params.lora.dropout (line 5): 1.5 is not a valid lora.dropout: Input should be less than 1",
        ),
        (
            "  params:\n    training.learning_rate: log_uniform(0, 1e-3)\n",
            "sweep.params.training.learning_rate (line 5): log_uniform needs a low bound above 0",
        ),
        (
            "  params:\n    training.learning_rate: log_uniform(1e-3, 1e-5)\n",
            "sweep.params.training.learning_rate (line 5): the low bound must be below the high bound",
        ),
        (
            "  params:\n    lora.r: int(2.5, 8)\n",
            "sweep.params.lora.r (line 5): the bounds of int must be integers",
        ),
        (
            "  params:\n    training.learning_rate: loguniform(1e-5, 1e-3)\n",
            "sweep.params.training.learning_rate (line 5): not a distribution: use log_uniform(a, b)",
        ),
        (
            "  params:\n    lora.r: choice([])\n",
            "sweep.params.lora.r (line 5): choice takes a non-empty list",
        ),
        (
            "  params:\n    lora.r: choice([8, 8])\n",
            "sweep.params.lora.r (line 5): a value is listed twice",
        ),
        ("  params: {}\n", "sweep.params (line 4): Dictionary should have at least 1 item"),
        ("  n_trials: 3\n", "sweep.params (line 3): Field required"),
        (
            "  params:\n    lora.r: int(2, 8)\n  objective: bleu\n",
            "sweep.objective (line 6): Input should be 'eval_loss', 'loss', 'perplexity', 'rougeL'",
        ),
        (
            "  params:\n    lora.r: int(2, 8)\n  objective: rougeL\n  direction: minimize\n",
            "sweep.direction (line 7): rougeL is better when higher, so the search must maximize it",
        ),
        (
            "  params:\n    lora.r: int(2, 8)\n  n_trials: null\n",
            "sweep.n_trials (line 6): set n_trials, timeout_minutes or both",
        ),
        (
            "  params:\n    lora.r: int(2, 8)\n  pruner: percentile\n",
            "sweep.pruner (line 6): Input should be 'none', 'median' or 'hyperband'",
        ),
        (
            "  params:\n    lora.r: int(2, 8)\n  storage: optuna.db\n",
            "sweep.storage (line 6): String should match pattern",
        ),
    ],
)
def test_every_validation_error_names_its_line(tmp_path, sweep, expected):
    found = problems(tmp_path, sweep)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_every_bad_entry_is_reported_at_once(tmp_path):
    found = problems(tmp_path, "  params:\n    lora.rank: int(2, 8)\n    lora.alpha: uniform(1, 2)\n  seed: x\n")
    assert [p.split(" (")[0] for p in found] == ["sweep.params.lora.rank", "sweep.params.lora.alpha", "sweep.seed"]


def test_a_sweep_needs_held_out_data(tmp_path):
    found = problems(tmp_path, "  params:\n    lora.r: int(2, 8)\n", extra="data:\n  validation_split: 0\n")
    assert found == [
        "data.validation_split (line 4): a sweep measures eval_loss on held-out data: set this above 0, or set "
        "data.validation_path (got 0.0)"
    ]


def test_nested_keys_and_overrides_name_the_same_keys(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("sweep:\n  params:\n    lora:\n      r: choice([4, 8])\n")
    cfg = load_config(JobConfig, path, ["sweep.params.training.learning_rate=log_uniform(1e-5, 1e-3)"])
    assert cfg.sweep is not None and set(cfg.sweep.params) == {"lora.r", "training.learning_rate"}
    space = cfg.sweep.space()
    assert space["training.learning_rate"].low == 1e-5 and space["lora.r"].choices == (4, 8)
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path, ["sweep.params.lora.rr=int(1, 2)"])
    assert err.value.problems[0].startswith("sweep.params.lora.rr (command line): 'lora.rr' is not a config key")


def test_choices_are_coerced_to_the_key_type_and_lists_survive_optuna(tmp_path):
    from tuneops.sweep import suggest, trial_config

    cfg = JobConfig.model_validate(
        {
            "sweep": {
                "params": {
                    "training.learning_rate": "choice([1e-4, 3e-4])",
                    "lora.target_modules": "choice([[q_proj, v_proj], all-linear])",
                }
            }
        }
    )
    assert cfg.sweep is not None
    space = cfg.sweep.space()
    assert space["training.learning_rate"].choices == (1e-4, 3e-4)  # YAML reads 1e-4 as text; the key is a float
    trial = optuna.trial.FixedTrial({"training.learning_rate": 3e-4, "lora.target_modules": '["q_proj", "v_proj"]'})
    values = {k: suggest(trial, k, d) for k, d in space.items()}
    assert values == {"training.learning_rate": 3e-4, "lora.target_modules": ["q_proj", "v_proj"]}
    one = trial_config(cfg, values, tmp_path / "t", "t-0")
    assert one.lora.target_modules == ["q_proj", "v_proj"] and one.training.learning_rate == 3e-4
    assert one.sweep is None and one.registry.register_version is False and one.training.output_dir == tmp_path / "t"


def test_objectives_are_the_quality_metrics_gates_know():
    from evaluate.gates import KNOWN_METRICS

    quality = {name for name, (suite, _) in KNOWN_METRICS.items() if suite == "quality"}
    quality.discard("judge_correct")  # graded by an `evaluation.judge` endpoint, which trials do not call
    assert "judge_correct" in KNOWN_METRICS
    assert set(get_args(Objective)) == quality | {"eval_loss"} == set(DIRECTIONS)


def test_sweep_without_a_sweep_section_exits_2_and_trains_nothing(tmp_path, tiny_base, capsys):
    path = sweep_job(tmp_path, tiny_base, f"sqlite:///{tmp_path}/mlflow.db", {})
    data = yaml.safe_load(path.read_text())
    del data["sweep"]
    path.write_text(yaml.safe_dump(data))
    assert run(["sweep", str(path)]) == 2
    assert "has no `sweep` section" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()


def test_a_bad_sweep_fails_before_anything_trains(tmp_path, tiny_base, capsys):
    path = sweep_job(tmp_path, tiny_base, f"sqlite:///{tmp_path}/mlflow.db", {"params": {"lora.r": "uniform(2, 8)"}})
    assert run(["sweep", str(path)]) == 2
    assert "sweep.params.lora.r (line" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()


# --- searches on the tiny model ------------------------------------------------------------------------------


@pytest.fixture
def prune_trial(monkeypatch: pytest.MonkeyPatch):
    """Make the pruner stop the given trial numbers at their first report (the pruning path is the real one)."""

    def prune(*numbers: int) -> None:
        monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number in numbers)

    return prune


@pytest.fixture
def trainings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The trial numbers this process trains (run_job calls made by the sweep)."""
    import tuneops.sweep

    seen: list[int] = []
    original = tuneops.sweep.run_job

    def counting(cfg, *args, **kwargs):
        seen.append(int(kwargs["run_tags"]["tuneops.sweep.trial"]))
        return original(cfg, *args, **kwargs)

    monkeypatch.setattr(tuneops.sweep, "run_job", counting)
    return seen


def test_sweep_runs_trials_as_child_runs_prunes_one_and_registers_only_the_best(
    tmp_path, tiny_base, mlflow_store, one_torch_thread, prune_trial, capsys
):
    prune_trial(1)
    path = sweep_job(
        tmp_path,
        tiny_base,
        mlflow_store,
        {"pruner": "median", "seed": 3},
        registry={"model_name": "swept", "promote": "auto"},
        evaluation={
            "suites": ["quality"],
            "max_examples": 3,
            "max_new_tokens": 4,
            "gates": ["perplexity <= 2 * base"],
            "bootstrap_samples": 100,
        },
    )
    assert run(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    client = connect(mlflow_store)
    parent, trials = runs_of(client)

    assert parent.info.status == "FINISHED" and parent.data.params["sweep.objective"] == "eval_loss"
    assert len(trials) == 4 and {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    by_number = {int(t.data.tags["tuneops.sweep.trial"]): t for t in trials}
    pruned = by_number[1]
    assert pruned.info.status == "KILLED" and pruned.data.tags["tuneops.trial_state"] == "PRUNED"
    assert pruned.data.tags["tuneops.pruned_at_step"] == "1"
    assert [m.step for m in client.get_metric_history(pruned.info.run_id, "eval_loss")] == [1]
    completed = [by_number[n] for n in (0, 2, 3)]
    assert all(t.info.status == "FINISHED" and t.data.tags["tuneops.trial_state"] == "COMPLETE" for t in completed)
    assert len({t.data.params["training.learning_rate"] for t in trials}) == 4  # each trial its own values
    assert all("sweep.params.lora.r" not in t.data.params for t in trials)  # a trial's config is a plain job
    assert [m.step for m in client.get_metric_history(completed[0].info.run_id, "eval_loss")][:2] == [1, 2]

    best = min(completed, key=lambda t: t.data.metrics["objective.eval_loss"])
    versions = client.search_model_versions("name = 'swept'")
    assert len(versions) == 1 and versions[0].run_id == best.info.run_id
    assert versions[0].tags["tuneops.sweep.trial"] == best.data.tags["tuneops.sweep.trial"]
    assert parent.data.tags["tuneops.sweep.best_run"] == best.info.run_id
    assert current_alias(client, "swept", CANDIDATE) == "1" and current_alias(client, "swept", PRODUCTION) == "1"

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"charts", "importance.json", "trials.csv", "best.json", "config"} <= artifacts
    charts = {a.path for a in client.list_artifacts(parent.info.run_id, "charts")}
    assert charts == {f"charts/{n}.png" for n in ("optimization_history", "intermediate_values", "param_importances")}
    importance = json.loads(Path(client.download_artifacts(parent.info.run_id, "importance.json")).read_text())
    assert set(importance) == {"training.learning_rate", "lora.r"}
    history = client.get_metric_history(parent.info.run_id, "trial_eval_loss")
    assert sorted(m.step for m in history) == [0, 2, 3]

    assert out.count("PRUNED") == 1 and "trial 1   PRUNED   at step 1" in out
    assert f"best:     trial {best.data.tags['tuneops.sweep.trial']}" in out and "importance:" in out
    assert "swept/1: promoted to production" in out and "PASS" in out


def test_an_interrupted_sweep_reruns_only_the_missing_trials(
    tmp_path, tiny_base, mlflow_store, one_torch_thread, trainings, monkeypatch, capsys
):
    path = sweep_job(tmp_path, tiny_base, mlflow_store, {"n_trials": 3, "pruner": "none", "sampler": "random"})
    with monkeypatch.context() as patch:

        def ctrl_c_in_trial_1(self):
            if self.number == 1:
                raise KeyboardInterrupt  # Ctrl-C while trial 1 trains
            return False

        patch.setattr(optuna.trial.Trial, "should_prune", ctrl_c_in_trial_1)
        assert run(["sweep", str(path)]) == 130
    assert trainings == [0, 1]
    client = connect(mlflow_store)
    parent, trials = runs_of(client)
    assert parent.info.status == "KILLED" and [t.info.status for t in trials] == ["FINISHED", "KILLED"]
    assert [t.data.tags["tuneops.trial_state"] for t in trials] == ["COMPLETE", "FAIL"]
    assert not client.search_model_versions("name = 'swept'")
    assert [t.state.name for t in study_of(tmp_path).trials] == ["COMPLETE", "FAIL"]

    trainings.clear()
    assert run(["sweep", str(path)]) == 0  # the same command again
    assert trainings == [2, 3]  # two more make three finished; trial 0 is not trained again
    parent_again, trials = runs_of(client)
    assert parent_again.info.run_id == parent.info.run_id and parent_again.info.status == "FINISHED"
    assert [t.data.tags["tuneops.trial_state"] for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    drawn = [t.params["training.learning_rate"] for t in study_of(tmp_path).trials]
    assert len(set(drawn)) == 4  # the rerun draws new values, not trial 0's again
    assert len(client.search_model_versions("name = 'swept'")) == 1

    trainings.clear()
    assert run(["sweep", str(path), "sweep.timeout_minutes=5"]) == 0  # a new budget is the same search
    assert trainings == [] and len(client.search_model_versions("name = 'swept'")) == 1
    assert "3 complete, 1 fail" in capsys.readouterr().out
    assert run(["sweep", str(path), "sweep.params.lora.r=choice([16, 32])"]) == 2
    assert "searches another job, space or objective" in capsys.readouterr().err


def test_a_quality_objective_is_measured_on_the_held_out_split_and_maximised(
    tmp_path, tiny_base, mlflow_store, one_torch_thread
):
    path = sweep_job(
        tmp_path,
        tiny_base,
        mlflow_store,
        {"n_trials": 2, "objective": "token_f1", "pruner": "none", "sampler": "random"},
        evaluation={"suites": ["quality"], "max_examples": 3, "max_new_tokens": 4, "on_train": False},
    )
    assert run(["sweep", str(path)]) == 0
    client = connect(mlflow_store)
    _, trials = runs_of(client)
    study = study_of(tmp_path)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    for trial, run_ in zip(study.trials, trials, strict=True):
        assert trial.value == pytest.approx(run_.data.metrics["quality.token_f1"])
        assert run_.data.metrics["objective.token_f1"] == pytest.approx(trial.value)
        assert {"quality.loss", "quality.rougeL"} <= set(run_.data.metrics)
        # the pruner compares validation losses the right way round: negated when the study maximises
        losses = {m.step: m.value for m in client.get_metric_history(run_.info.run_id, "eval_loss")}
        assert trial.intermediate_values == pytest.approx({step: -loss for step, loss in losses.items()})
    assert study.best_trial.value == max(t.value for t in study.trials)
    assert len(client.search_model_versions("name = 'swept'")) == 1


def test_pruners_are_built_from_the_section():
    from tuneops.sweep import _pruner

    def job(**sweep: Any) -> JobConfig:
        return JobConfig.model_validate(
            {"training": {"eval_steps": 7}, "sweep": {"params": {"lora.r": "int(2, 8)"}, **sweep}}
        )

    hyperband = _pruner(job(pruner="hyperband"))
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner) and hyperband._min_resource == 7
    median = _pruner(job(pruner="median", pruner_startup_trials=3, pruner_warmup_steps=14))
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert (median._n_startup_trials, median._n_warmup_steps) == (3, 14)
    assert isinstance(_pruner(job(pruner="none")), optuna.pruners.NopPruner)


# --- several workers on one PostgreSQL study ------------------------------------------------------------------


@pytest.fixture
def optuna_database(tracking_server) -> Iterator[str]:
    """A fresh database for Optuna in the session's PostgreSQL cluster (beside the MLflow server's); its URL."""
    import psycopg

    name = f"optuna_{uuid.uuid4().hex[:8]}"
    admin = tracking_server.stack.database_uri("postgres").replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield tracking_server.stack.database_uri(name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.integration
def test_two_workers_share_one_postgresql_study_and_one_parent_run(
    tmp_path, tiny_base, tracking_server, optuna_database, monkeypatch
):
    tracking_server.reset()
    uri = tracking_server.uri  # the team's MLflow server, as every machine would reach it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    path = sweep_job(tmp_path, tiny_base, uri, {"storage": optuna_database, "pruner": "none"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tuneops", "sweep", str(path), "--worker"]
    workers = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    deadline = time.monotonic() + 600
    for proc in workers:
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert proc.returncode == 0, out
        assert "postgresql+psycopg://tuneops:***@" in out  # the storage is named, its password never shown
    study = optuna.load_study(study_name="job", storage=optuna_database)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 4, [(t.number, t.state) for t in study.trials]
    assert len({t.user_attrs["tuneops.owner"] for t in finished}) == 2  # both workers trained trials
    client = connect(uri)
    parent, trials = runs_of(client)
    assert len(trials) == 4 and {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    assert parent.info.status == "RUNNING" and not client.search_model_versions("name = 'swept'")

    # the coordinator finishes the study: no trial left to train, the best one registered
    assert run(["sweep", str(path)]) == 0
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    versions = client.search_model_versions("name = 'swept'")
    best = min(finished, key=lambda t: t.value)
    assert len(versions) == 1 and versions[0].run_id == best.user_attrs["tuneops.run_id"]
    assert len(runs_of(client)[1]) == 4
