"""Job and gateway settings that must fail fast and safely: alias bombs, unreadable values, secrets, exposure."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.config import load_config
from core.errors import ConfigError
from core.schema.job import JobConfig


def problems_of(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path, overrides)
    return err.value.problems


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        levels.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\n")
    assert len(path.read_bytes()) < 400
    started = time.perf_counter()
    found = problems_of(path)
    assert time.perf_counter() - started < 2.0
    assert "YAML aliases expand to more than" in found[0]


def test_yaml_aliases_of_normal_size_still_work(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("training:\n  learning_rate: &lr 0.001\n  eval_steps: 5\n  save_steps: 5\ndata:\n  seed: 7\n")
    assert load_config(JobConfig, path).training.learning_rate == 0.001


def test_an_integer_too_long_to_read_names_its_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("training:\n  seed: " + "9" * 5000 + "\n")
    assert problems_of(path)[0].startswith("line 2: a value cannot be read")


def test_deep_nesting_is_a_config_error(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data: " + "[" * 5000 + "]" * 5000 + "\n")
    assert problems_of(path) == ["the YAML is nested too deeply"]


def test_an_unreadable_override_names_the_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("training: {}\n")
    assert problems_of(path, ["training.seed=" + "9" * 5000]) == [
        "override training.seed: the value cannot be read (ValueError)"
    ]


def test_a_huge_wrong_value_is_shown_shortened(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  max_length: '" + "x" * 5000 + "'\n")
    found = problems_of(path)[0]
    assert found.startswith("data.max_length (line 2)") and len(found) < 400


def test_a_plain_api_key_is_never_printed_back(tmp_path):
    from serve.settings import load_settings

    path = tmp_path / "serve.yaml"
    path.write_text("models: [m]\napi_keys: [sk-very-secret-key]\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "api_keys (line 2)" in str(err.value) and "sk-very-secret" not in str(err.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.internal"])
def test_a_gateway_reachable_from_other_machines_needs_keys(tmp_path, host):
    from serve.settings import load_settings

    path = tmp_path / "serve.yaml"
    path.write_text(f"models: [m]\nhost: '{host}'\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert f"host {host} is reachable from other machines" in str(err.value)
    path.write_text(f"models: [m]\nhost: '{host}'\nallow_unauthenticated: true\n")
    assert load_settings(path).host == host
    path.write_text(f"models: [m]\nhost: '{host}'\napi_keys: ['{'a' * 64}']\n")
    assert load_settings(path).api_keys == ["a" * 64]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_needs_no_keys(tmp_path, host):
    from serve.settings import load_settings

    path = tmp_path / "serve.yaml"
    path.write_text(f"models: [m]\nhost: '{host}'\n")
    assert load_settings(path).host == host
