"""The MLflow pyfunc flavour of a tuneops version: base model by reference plus a LoRA adapter.

`mlflow.pyfunc.load_model("models:/NAME/VERSION").predict(["question", ...])` answers offline.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from core.registry import ADAPTER_DIR, BASE_MODEL_TAG, MANIFEST_FILE, Manifest


class AdapterModel(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]
    """Opens the bundled version (base checked, adapter attached, as core.version does) and generates greedily."""

    # The signature is explicit (log_version_model) and carries `params`; MLflow's type-hint wrapping would
    # infer another from `predict` and warn that it has no hint to infer from.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        import torch

        from core.device import choose_device, choose_dtype
        from core.version import OpenedVersion

        version = OpenedVersion.read(Path(context.artifacts["bundle"]))
        self.manifest = version.manifest
        self.device = choose_device("auto")
        self.tokenizer = version.tokenizer()
        self.eos_ids = version.eos_ids(self.tokenizer)
        model = version.load_base(self.device, choose_dtype("auto", self.device))
        self.model = version.attach(model, "default").eval()
        self._torch = torch

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:  # type: ignore[no-untyped-def]
        from core.chat import prompt_ids

        params = params or {}
        max_new = int(params.get("max_new_tokens", 128))
        prompts = _as_message_lists(model_input)
        outputs = []
        for messages in prompts:
            ids = prompt_ids(self.tokenizer, messages, self.manifest.chat_template, self.manifest.system_prompt)
            x = self._torch.tensor([ids], device=self.device)
            with self._torch.inference_mode():
                out = self.model.generate(
                    input_ids=x,
                    attention_mask=self._torch.ones_like(x),
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=self.eos_ids,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            outputs.append(str(self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)).strip())
        return outputs


def _as_message_lists(model_input: Any) -> list[list[dict[str, str]]]:
    """Accept a string, a list of strings, a list of chats, or a DataFrame with `prompt` or `messages`."""
    if hasattr(model_input, "columns"):
        if "messages" in model_input.columns:
            return [list(m) for m in model_input["messages"]]
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        model_input = list(model_input[column])
    if isinstance(model_input, str):
        model_input = [model_input]
    out = []
    for item in model_input:
        if isinstance(item, str):
            out.append([{"role": "user", "content": item}])
        else:
            out.append([dict(m) for m in item])
    return out


def log_version_model(bundle: Path, pip_requirements: list[str]) -> Any:
    """Log the bundle (manifest + adapter) as a pyfunc model on the active run; returns its ModelInfo."""
    from mlflow.models import infer_signature

    signature = infer_signature(["What is a building permit?"], ["An answer."], params={"max_new_tokens": 128})
    with warnings.catch_warnings():
        # An input example would make MLflow load the base model and generate while logging; the signature says
        # what the input is, so the example's absence is deliberate.
        warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=AdapterModel(),
            artifacts={"bundle": str(bundle)},
            pip_requirements=pip_requirements,
            signature=signature,
        )


def write_bundle(dest: Path, adapter_model: Any, tokenizer: Any, manifest: Manifest) -> Path:
    """Write what a version consists of: the adapter (safetensors), its tokenizer, and the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    adapter_model.save_pretrained(dest / ADAPTER_DIR, safe_serialization=True)
    tokenizer.save_pretrained(dest / ADAPTER_DIR)
    (dest / MANIFEST_FILE).write_text(manifest.to_json())
    return dest


def publish_version(
    bundle: Path,
    model_name: str,
    tags: dict[str, str] | None = None,
    pip_requirements: list[str] | None = None,
) -> Any:
    """Log the bundle as a pyfunc model on the active run and register it; returns the new ModelVersion.

    The version is tagged with its base model, so listing versions (the gateway's /v1/models) needs no download.
    """
    import mlflow

    from core.registry import library_versions

    libs = library_versions()
    reqs = pip_requirements or [f"{k}=={v}" for k, v in libs.items() if k != "tuneops"]
    info = log_version_model(bundle, reqs)
    manifest = Manifest.read(bundle / MANIFEST_FILE)
    version_tags = {BASE_MODEL_TAG: manifest.base_model, **(tags or {})}
    return mlflow.register_model(info.model_uri, model_name, tags=version_tags)
