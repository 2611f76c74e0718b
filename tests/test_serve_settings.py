"""Settings (YAML + environment, unknown keys refused), the CLI, the real model end to end, and CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_serve_support import CHAT, running_gateway


def test_settings_from_yaml_with_environment_overrides(tmp_path, monkeypatch):
    from serve.settings import load_settings

    path = tmp_path / "serve.yaml"
    path.write_text("models: [faq-assistant]\nport: 9000\nlimits: {max_n: 2}\n")
    monkeypatch.setenv("TUNEOPS_SERVE_PORT", "9100")
    monkeypatch.setenv("TUNEOPS_SERVE_LIMITS__MAX_QUEUE", "3")
    s = load_settings(path)
    assert (s.models, s.port, s.limits.max_n, s.limits.max_queue) == (["faq-assistant"], 9100, 2, 3)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("models: [m]\nlimts: {max_n: 2}\n", "limts (line 2): unknown key; did you mean 'limits'?"),
        ("models: [m]\napi_keys: [plain-secret]\n", "api_keys"),
        ("models: []\n", "models"),
        ("models: [m]\nlimits: {max_batch_size: 0}\n", "limits.max_batch_size (line 2)"),
    ],
)
def test_bad_settings_are_reported_with_their_line(tmp_path, text, problem):
    from core.errors import ConfigError
    from serve.settings import load_settings

    path = tmp_path / "serve.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert problem in str(err.value)


def test_shipped_config_is_valid_and_every_field_is_described():
    from serve.settings import Limits, ServeSettings, load_settings

    s = load_settings(Path(__file__).parents[1] / "configs" / "serve.yaml")
    assert s.models == ["faq-assistant"] and (s.host, s.port) == ("127.0.0.1", 8000)
    for schema in (ServeSettings, Limits):
        assert all(f.description for f in schema.model_fields.values())


def test_cli_refuses_a_bad_config_and_hashes_keys(tmp_path):
    from typer.testing import CliRunner

    from serve.auth import hash_key
    from tuneops.cli import app

    bad = tmp_path / "serve.yaml"
    bad.write_text("models: [m]\nprot: 1\n")
    result = CliRunner().invoke(app, ["serve", "--config", str(bad)])
    assert result.exit_code == 2 and "prot" in result.output
    result = CliRunner().invoke(app, ["serve-key-hash", "s3cret"])
    assert result.exit_code == 0 and result.output.strip() == hash_key("s3cret")


@pytest.mark.integration
def test_real_smollm2_version_end_to_end(store, smollm2):
    """A LoRA version on the real SmolLM2 base, served in bf16/fp32 as core.device chooses."""
    store.publish("real-model", seed=0, base_dir=smollm2.path, alias="production")
    with running_gateway(["real-model"], dtype="auto") as gw:
        client = gw.client()
        out = client.chat.completions.create(
            model="real-model",
            temperature=0,
            max_tokens=24,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert out.choices[0].message.content.strip() and out.usage.completion_tokens <= 24
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="real-model",
                temperature=0,
                max_tokens=24,
                stream=True,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
            )
            if c.choices
        )
        assert streamed == out.choices[0].message.content
        [card] = [m for m in client.models.list() if m.id == "real-model"]
        assert card.parent == str(smollm2.path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gateway_on_cuda_batches_concurrent_requests(store):
    from concurrent.futures import ThreadPoolExecutor

    store.publish("cuda-model", seed=0, alias="production")
    with running_gateway(["cuda-model"], device="cuda", dtype="auto") as gw:
        client = gw.client()

        def ask(_):
            return client.chat.completions.create(model="cuda-model", messages=CHAT, max_tokens=16, temperature=0)

        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(ask, range(8)))
        assert len({o.choices[0].message.content for o in outs}) == 1
        assert all(o.usage.completion_tokens == 16 for o in outs)
