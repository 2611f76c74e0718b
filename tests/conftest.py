"""Shared fixtures: a tiny random model on the real tokenizer, a temporary MLflow store, registered versions."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small models on shared cores: one torch thread avoids OpenMP oversubscription stalls (4-8x here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded base model, converted once into the shared cache."""
    from core.models import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, smollm2) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template: fast, but real shapes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.models import load_tokenizer

    tokenizer = load_tokenizer(smollm2)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh SQLite tracking store with its artifacts under tmp_path; yields the tracking URI."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def make_version(tiny_base: Path, mlflow_store: str, tmp_path: Path) -> Callable[..., object]:
    """Register a version of a random LoRA adapter on the tiny base; returns its VersionRef.

    `seed` changes the adapter weights, so two versions answer differently.
    """

    def make(name: str = "tiny-model", seed: int = 0, system_prompt: str | None = None):
        import mlflow
        import torch
        from peft import LoraConfig, get_peft_model

        from core.models import load_causal_lm, load_tokenizer, weights_digest
        from core.pyfunc import publish_version, write_bundle
        from core.registry import Manifest, connect, resolve_version

        torch.manual_seed(seed)
        tokenizer = load_tokenizer(tiny_base)
        base = load_causal_lm(tiny_base, torch.device("cpu"), torch.float32)
        model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )
        manifest = Manifest(
            base_model=str(tiny_base),
            base_digest=weights_digest(tiny_base),
            chat_template=tokenizer.chat_template,
            eos_token=tokenizer.eos_token,
            system_prompt=system_prompt,
            max_length=512,
            job_name="test",
        )
        bundle = write_bundle(tmp_path / f"bundle-{name}-{seed}", model, tokenizer, manifest)
        client = connect(mlflow_store)
        mlflow.set_experiment("tests")
        with mlflow.start_run():
            mv = publish_version(bundle, name, pip_requirements=["torch"])
        return resolve_version(client, f"{name}/{mv.version}")

    return make
