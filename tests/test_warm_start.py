"""`lora.init_from`: a fine-tune that continues a registered version's adapter instead of a fresh one."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from core.config import load_config
from core.errors import ConfigError
from core.registry import connect, download_version, resolve_version
from core.schema.job import JobConfig
from finetune.job import INIT_FROM_RUN_TAG, INIT_FROM_TAG, check, run_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LR = 1e-3


def job(tmp_path: Path, tiny_base: Path, uri: str, init_from: str | None, experiment: str = "t", **lora) -> JobConfig:
    data = {
        "model": {"base": str(tiny_base)},
        "data": {"path": "builtin:zaragoza-faq", "max_examples": 12, "max_length": 256, "validation_split": 0.0},
        "lora": {"r": 4, "alpha": 8, "init_from": init_from, **lora},
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 2,
            "batch_size": 4,
            "save_steps": 2,
            "logging_steps": 1,
            "learning_rate": LR,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
        },
        "tracking": {"tracking_uri": uri, "experiment": experiment},
        "registry": {"model_name": "tiny-warm"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(JobConfig, path)


def adapter_weights(uri: str, ref: str, dest: Path) -> dict[str, torch.Tensor]:
    client = connect(uri)
    folder = download_version(client, resolve_version(client, ref), dest)
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path)
    return err.value.problems


# --- config time: the reference grammar (core.registry.REF) ---


@pytest.mark.parametrize("ref", ["faq", "faq@production", "faq-v2.1@candidate_2", "faq/12"])
def test_init_from_accepts_name_alias_and_version(tmp_path, ref):
    path = tmp_path / "job.yaml"
    path.write_text(f"lora:\n  init_from: '{ref}'\n")
    assert load_config(JobConfig, path).lora.init_from == ref


@pytest.mark.parametrize("ref", ["faq/x", "faq@", "faq@a/1", "@production", "bad name", "faq/1\n"])
def test_init_from_that_is_not_a_reference_is_refused_at_config_time(tmp_path, ref):
    found = problems(tmp_path, yaml.safe_dump({"lora": {"init_from": ref}}))
    assert found[0].startswith("lora.init_from (line 2): Value error, not a version reference: write NAME")


def test_init_from_defaults_to_a_fresh_adapter(tmp_path):
    assert JobConfig().lora.init_from is None


# --- the job: one store for the module, one registered version to continue ---


@pytest.fixture(scope="module")
def old(store):
    """The version jobs continue: its LoRA B is random too (a fresh adapter's is 0), r=4, alpha=8, all-linear."""
    return store.publish("tiny-model", seed=3, alias="production")


def test_a_job_continues_the_registered_adapter_and_records_where_it_came_from(tmp_path, tiny_base, store, old, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="finetune.recipe"):
        result = run_job(job(tmp_path, tiny_base, store.uri, "tiny-model"), "warm")
    assert f"lora: starting from {old.label}" in caplog.text

    before = adapter_weights(store.uri, old.label, tmp_path / "old")
    after = adapter_weights(store.uri, f"tiny-warm/{result.version}", tmp_path / "new")
    assert before.keys() == after.keys() and any("lora_B" in k for k in before)
    # Two Adam steps move each weight by at most about 2 * lr: the run began at the old weights and trained them.
    drift = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0 < drift <= 2.5 * LR
    assert max(before[k].abs().max().item() for k in before if "lora_B" in k) > 100 * LR  # not a fresh B = 0

    client = connect(store.uri)
    run = client.get_run(result.run_id)
    assert run.data.tags[INIT_FROM_TAG] == old.label and run.data.tags[INIT_FROM_RUN_TAG] == old.run_id
    assert run.data.params["lora.init_from"] == "tiny-model"  # as written; the tag says what it resolved to
    version_tags = client.get_model_version("tiny-warm", result.version).tags
    assert version_tags[INIT_FROM_TAG] == old.label and version_tags[INIT_FROM_RUN_TAG] == old.run_id


def test_an_unknown_reference_names_lora_init_from_and_leaves_no_run(tmp_path, tiny_base, store, old):
    cfg = job(tmp_path, tiny_base, store.uri, "nope", experiment="unknown-reference")
    with pytest.raises(ConfigError) as err:
        run_job(cfg, "warm")
    assert err.value.problems == ["lora.init_from: cannot start from 'nope': no registered model named 'nope'"]
    assert connect(store.uri).get_experiment_by_name("unknown-reference") is None
    for ref, says in (
        ("tiny-model@staging", "model 'tiny-model' has no alias 'staging'"),
        ("tiny-model/9", "model 'tiny-model' has no version 9"),
    ):
        with pytest.raises(ConfigError) as err:
            check(job(tmp_path, tiny_base, store.uri, ref))
        assert err.value.problems == [f"lora.init_from: cannot start from '{ref}': {says}"]


def test_a_version_of_another_base_is_refused_naming_both(tmp_path, tiny_base, store):
    other = store.publish("other-base", base_digest="sha256:other")
    with pytest.raises(ConfigError) as err:
        check(job(tmp_path, tiny_base, store.uri, other.label))
    (problem,) = err.value.problems
    assert problem.startswith("lora.init_from: ") and "model.base" in problem
    assert "sha256:other" in problem and str(tiny_base) in problem


def test_a_rank_mismatch_names_lora_r_and_both_values(tmp_path, tiny_base, store, old):
    with pytest.raises(ConfigError) as err:
        check(job(tmp_path, tiny_base, store.uri, old.label, r=8, alpha=16))
    assert err.value.problems == [
        f"lora.r: this job sets 8, but the adapter of {old.label} (lora.init_from) was trained with 4; "
        "set lora.r to 4 to continue it",
        f"lora.alpha: this job sets 16, but the adapter of {old.label} (lora.init_from) was trained with 8; "
        "set lora.alpha to 8 to continue it",
    ]


def test_target_modules_compare_by_the_layers_they_adapt(tmp_path, tiny_base, store, old):
    """The adapter was trained with all-linear: the explicit list of every linear layer is the same adapter."""
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    checked = check(job(tmp_path, tiny_base, store.uri, old.label, target_modules=every))
    assert checked.init is not None and checked.init.label == old.label
    with pytest.raises(ConfigError) as err:
        check(job(tmp_path, tiny_base, store.uri, old.label, target_modules=["q_proj", "v_proj"]))
    assert err.value.problems == [
        "lora.target_modules: this job's [q_proj, v_proj] adapts 4 layers (q_proj, v_proj), but the adapter of "
        f"{old.label} (lora.init_from) adapts 14 (down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj); "
        "set lora.target_modules to all-linear"
    ]


def test_attach_lora_refuses_init_from_without_the_checked_version(tiny_base):
    """Scripts that call attach_lora directly cannot silently train a fresh adapter for a warm-start job."""
    from finetune.recipe import attach_lora

    cfg = JobConfig.model_validate({"lora": {"init_from": "tiny-model"}})
    with pytest.raises(ValueError, match=r"lora\.init_from is 'tiny-model'"):
        attach_lora(torch.nn.Linear(2, 2), cfg)  # type: ignore[arg-type]


def test_a_reused_check_cannot_load_the_adapter_into_another_shape(tmp_path, tiny_base, store, old):
    """A sweep checks once and varies keys per trial: the shape is checked again where the adapter loads."""
    checked = check(job(tmp_path, tiny_base, store.uri, old.label))
    trial = job(tmp_path, tiny_base, store.uri, old.label, experiment="reused", r=8, alpha=16)
    with pytest.raises(ConfigError, match=r"lora\.r: this job sets 8, but the adapter of .* was trained with 4"):
        run_job(trial, "trial", checked=checked)
