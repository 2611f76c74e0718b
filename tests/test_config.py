"""One test per validation rule of the job schema, plus every shipped config validates."""

from pathlib import Path

import pytest

from core.config import config_hash, load_config
from core.errors import ConfigError
from core.schema.job import JobConfig

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, write(tmp_path, text), overrides)
    return err.value.problems


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "serve.yaml"], ids=lambda p: p.name)
def test_every_shipped_job_config_validates(path):
    cfg = load_config(JobConfig, path)
    assert cfg.registry.model_name


def test_defaults_fill_a_complete_job(tmp_path):
    cfg = load_config(JobConfig, write(tmp_path, "model: {base: smollm2-135m-instruct}\n"))
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.training.packing is True
    assert len(config_hash(cfg)) == 16


def test_misspelt_key_suggests_the_right_one_with_its_line(tmp_path):
    found = problems(tmp_path, "model:\n  base: x\ntraining:\n  learnig_rate: 0.1\n")
    assert found == ["training.learnig_rate (line 4): unknown key; did you mean 'learning_rate'?"]


def test_unknown_section_is_reported(tmp_path):
    assert problems(tmp_path, "trainer: {}\n")[0].startswith("trainer (line 1): unknown key")


def test_wrong_type_names_field_line_and_value(tmp_path):
    found = problems(tmp_path, "data:\n  max_length: lots\n")
    assert found[0].startswith("data.max_length (line 2): Input should be a valid integer")
    assert "'lots'" in found[0]


def test_out_of_range_value(tmp_path):
    found = problems(tmp_path, "data:\n  validation_split: 1.5\n")
    assert found[0].startswith("data.validation_split (line 2): Input should be less than 1")


def test_every_error_is_reported_at_once(tmp_path):
    found = problems(tmp_path, "lora:\n  r: 0\n  dropout: 2\ntraining:\n  epochs: -1\n")
    assert [p.split(" ")[0] for p in found] == ["lora.r", "lora.dropout", "training.epochs"]


def test_literal_choices_are_enforced(tmp_path):
    found = problems(tmp_path, "model:\n  dtype: float8\n")
    assert found[0].startswith("model.dtype (line 2): Input should be 'auto', 'bf16', 'fp16' or 'fp32'")


def test_target_modules_accepts_all_linear_or_a_list(tmp_path):
    cfg = load_config(JobConfig, write(tmp_path, "lora:\n  target_modules: [q_proj, v_proj]\n"))
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert problems(tmp_path, "lora:\n  target_modules: some\n")[0].startswith("lora.target_modules")


def test_registered_model_name_must_be_a_plain_name(tmp_path):
    assert problems(tmp_path, "registry:\n  model_name: 'bad name/x'\n")[0].startswith("registry.model_name (line 2)")


def test_early_stopping_needs_saves_on_evaluations(tmp_path):
    found = problems(tmp_path, "training:\n  early_stopping_patience: 2\n  eval_steps: 20\n  save_steps: 30\n")
    assert "save_steps to be a multiple of eval_steps" in found[0]


def test_overrides_apply_and_are_validated(tmp_path):
    path = write(tmp_path, "training:\n  learning_rate: 0.001\n")
    cfg = load_config(JobConfig, path, ["training.learning_rate=5e-5", "lora.target_modules=[q_proj]"])
    assert cfg.training.learning_rate == 5e-5
    assert cfg.lora.target_modules == ["q_proj"]
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path, ["training.batch_size=zero"])
    assert err.value.problems[0].startswith("training.batch_size (command line)")


def test_malformed_override_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(JobConfig, write(tmp_path, "{}\n"), ["training.learning_rate"])


def test_invalid_yaml_names_the_line(tmp_path):
    assert problems(tmp_path, "model:\n  base: [unclosed\n")[0].startswith("line 3: invalid YAML")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(JobConfig, tmp_path / "nope.yaml")


def test_config_hash_changes_with_any_value(tmp_path):
    path = write(tmp_path, "{}\n")
    a = config_hash(load_config(JobConfig, path))
    b = config_hash(load_config(JobConfig, path, ["lora.r=8"]))
    assert a != b


def test_retrain_job_is_the_default_job_continued_from_production():
    """configs/retrain.yaml may differ from the default job only where retraining should."""
    root = Path(__file__).resolve().parents[1] / "configs"
    default = load_config(JobConfig, root / "default.yaml").model_dump(mode="json")
    retrain = load_config(JobConfig, root / "retrain.yaml").model_dump(mode="json")
    assert retrain["lora"].pop("init_from") == "faq-assistant@production"
    assert default["lora"].pop("init_from") is None
    for key in ("output_dir", "max_steps", "learning_rate"):
        default["training"].pop(key)
        retrain["training"].pop(key)
    assert retrain == default
