"""core.version: opening a registered version, the base-weights check, the tokenizer source, EOS ids, attach."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from core.errors import ModelError
from core.registry import Manifest, connect
from core.version import OpenedVersion, open_version

CPU, FP32 = torch.device("cpu"), torch.float32


def opened(make_version, mlflow_store: str, tmp_path: Path, **kwargs) -> OpenedVersion:
    ref = make_version(**kwargs)
    return open_version(connect(mlflow_store), ref, tmp_path / f"opened-{ref.version}")


def test_opens_by_ref_string_with_manifest_adapter_and_label(make_version, mlflow_store, tmp_path, tiny_base):
    ref = make_version(system_prompt="Be brief.")
    version = open_version(connect(mlflow_store), "tiny-model/1", tmp_path / "v")
    assert version.ref == ref and version.label == "tiny-model/1"
    assert version.manifest.base_model == str(tiny_base) and version.manifest.system_prompt == "Be brief."
    assert (version.adapter_path / "adapter_config.json").is_file()
    assert version.base().path == tiny_base.resolve()


def test_base_with_other_weights_is_refused_naming_the_version(make_version, mlflow_store, tmp_path):
    version = opened(make_version, mlflow_store, tmp_path, base_digest="sha256:" + "0" * 64)
    with pytest.raises(ModelError, match=r"tiny-model/1 was trained on .* with weights sha256:0{64}, but base model"):
        version.base()
    with pytest.raises(ModelError, match="tiny-model/1"):
        version.load_base(CPU, FP32)


def test_manifest_without_digest_is_refused_everywhere(make_version, mlflow_store, tmp_path):
    from evaluate.subjects import load_subjects

    version = opened(make_version, mlflow_store, tmp_path, base_digest="")
    with pytest.raises(ModelError, match="tiny-model/1 records no base-weights digest"):
        version.tokenizer()
    with pytest.raises(ModelError, match="tiny-model/1 records no base-weights digest"):
        load_subjects(version, None, with_base=False, device_pref="cpu", dtype_pref="fp32")


def test_a_second_version_on_a_loaded_base_must_share_its_digest(make_version, mlflow_store, tmp_path):
    first = opened(make_version, mlflow_store, tmp_path, seed=1)
    other = opened(make_version, mlflow_store, tmp_path, seed=2, base_digest="sha256:other")
    base = first.base()
    assert first.check_base(base) is base
    with pytest.raises(ModelError, match=r"tiny-model/2 was trained on .*sha256:other"):
        other.check_base(base)


def test_tokenizer_is_the_base_models_not_the_adapters_copy(make_version, mlflow_store, tmp_path, tiny_base):
    from core.models import load_tokenizer

    version = opened(make_version, mlflow_store, tmp_path)
    shutil.rmtree(version.adapter_path)
    version.adapter_path.mkdir()
    (version.adapter_path / "tokenizer_config.json").write_text("not json")  # never read
    tokenizer = version.tokenizer()
    assert Path(tokenizer.name_or_path).resolve() == tiny_base.resolve()
    assert tokenizer.get_vocab() == load_tokenizer(tiny_base).get_vocab()


def test_eos_ids_put_the_manifest_token_first_and_refuse_an_unknown_one(tiny_base, tmp_path):
    from core.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_base)

    def version(eos: str) -> OpenedVersion:
        return OpenedVersion("m/1", Manifest(str(tiny_base), "sha256:x", None, eos), tmp_path)

    own = tokenizer.eos_token_id
    assert version(tokenizer.eos_token).eos_ids(tokenizer) == [own]
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert start != own and version("<|im_start|>").eos_ids(tokenizer) == [start, own]
    with pytest.raises(ModelError, match=r"m/1: EOS token '<\|no-such-token\|>' is not in the vocabulary"):
        version("<|no-such-token|>").eos_ids(tokenizer)


def test_attach_wraps_a_model_then_adds_adapters_beside_it(make_version, mlflow_store, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    first = opened(make_version, mlflow_store, tmp_path, seed=1)
    second = opened(make_version, mlflow_store, tmp_path, seed=2)
    plain = first.load_base(CPU, FP32).eval()
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        base_logits = plain(x).logits
    model = first.attach(plain, "one")
    assert isinstance(model, PeftModel) and second.attach(model, "two") is model
    assert set(model.peft_config) == {"one", "two"}

    saved = load_file(first.adapter_path / "adapter_model.safetensors")
    key = next(k for k in saved if "lora_A" in k)
    loaded = model.state_dict()[key.replace("lora_A.weight", "lora_A.one.weight")]
    assert torch.equal(loaded, saved[key])

    model.eval()
    with torch.no_grad():
        model.set_adapter("one")
        one = model(x).logits
        model.set_adapter("two")
        two = model(x).logits
        with model.disable_adapter():
            bare = model(x).logits
    assert not torch.allclose(one, two) and not torch.allclose(one, base_logits)
    assert torch.allclose(bare, base_logits)
