"""A registered version, opened: its manifest and adapter in a working folder, ready to run on its base model.

The pyfunc flavour, evaluation and the gateway all run versions through `OpenedVersion`, so one set of rules
holds everywhere:

- The base model is the one the manifest names, and its weights must have the digest the version was trained
  on. A manifest without a digest is refused too: nothing could then vouch that the adapter fits the weights.
  The check runs once per opened version; a version placed on a base already loaded and checked (a second
  adapter on a shared base) is compared with that base's digest instead of resolving it again.
- The tokenizer is the base model's, never the copy saved beside the adapter. Training tokenizes with the
  base's tokenizer unchanged and records what belongs to the version (chat template, EOS token, system prompt)
  in the manifest, so the two copies are the same; taking the base's lets one tokenizer serve every version
  of a base (the gateway batches many adapters over one base) and keeps the vocabulary tied to the embedding
  rows it indexes. The adapter's copy stays in the artifact for readers outside tuneops.
- The EOS ids are the manifest's EOS token first (the answer terminator, which must be in the vocabulary),
  then the tokenizer's own EOS when it differs.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ModelError
from core.registry import ADAPTER_DIR, MANIFEST_FILE, Manifest, VersionRef, download_version, resolve_version

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from core.models import BaseModelRef

log = logging.getLogger(__name__)


@dataclass
class OpenedVersion:
    """A version's manifest and the folder holding `manifest.json` and `adapter/`; `label` names it in errors."""

    label: str
    manifest: Manifest
    root: Path
    ref: VersionRef | None = None
    _base: BaseModelRef | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def read(cls, root: Path, ref: VersionRef | None = None, label: str | None = None) -> OpenedVersion:
        """A version already on disk (a downloaded or bundled folder); `label` defaults to the ref's."""
        manifest = Manifest.read(root / MANIFEST_FILE)
        name = label or (ref.label if ref is not None else f"the version in {root}")
        return cls(name, manifest, root, ref)

    @property
    def adapter_path(self) -> Path:
        return self.root / ADAPTER_DIR

    def check_base(self, base: BaseModelRef) -> BaseModelRef:
        """Refuse a base whose weights are not the ones this version was trained on; returns `base`."""
        expected = self.manifest.base_digest
        if not expected:
            raise ModelError(
                f"{self.label} records no base-weights digest in its manifest, so the weights of "
                f"{self.manifest.base_model} cannot be checked: re-register it with a digest"
            )
        if base.digest != expected:
            raise ModelError(
                f"{self.label} was trained on {self.manifest.base_model} with weights {expected}, "
                f"but base model {base.name} has weights {base.digest}"
            )
        return base

    def base(self) -> BaseModelRef:
        """The base model the manifest names, resolved and checked once."""
        if self._base is None:
            from core.models import resolve_base_model

            self._base = self.check_base(resolve_base_model(self.manifest.base_model))
        return self._base

    def load_base(self, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
        """The checked base model's weights on a device in a dtype, without the adapter."""
        from core.models import load_causal_lm

        base = self.base()
        log.info("loading %s for %s on %s in %s", base.name, self.label, device, dtype)
        return load_causal_lm(base, device, dtype)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The checked base model's tokenizer (see the module docstring for why not the adapter's copy)."""
        from core.models import load_tokenizer

        return load_tokenizer(self.base())

    def eos_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The manifest's EOS id first, then the tokenizer's own when it differs; `tokenizer` is this version's."""
        eos = tokenizer.convert_tokens_to_ids(self.manifest.eos_token)
        if not isinstance(eos, int) or eos < 0 or eos == tokenizer.unk_token_id:
            raise ModelError(f"{self.label}: EOS token {self.manifest.eos_token!r} is not in the vocabulary")
        ids = [eos]
        own = tokenizer.eos_token_id
        if isinstance(own, int) and own >= 0 and own not in ids:
            ids.append(own)
        return ids

    def attach(self, model: Any, adapter_name: str) -> Any:
        """Put this version's adapter on `model` under `adapter_name`; returns the PeftModel carrying it.

        A plain model is wrapped; a PeftModel gets one more adapter beside those it has.
        """
        from peft import PeftModel

        with warnings.catch_warnings():
            # peft reads the model's deprecated `is_gradient_checkpointing` property itself; nothing to change here.
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            if isinstance(model, PeftModel):
                model.load_adapter(str(self.adapter_path), adapter_name=adapter_name)
                return model
            return PeftModel.from_pretrained(model, self.adapter_path, adapter_name=adapter_name)


def open_version(client: MlflowClient, ref: VersionRef | str, dest: Path) -> OpenedVersion:
    """Download a version (a VersionRef or any spelling `resolve_version` accepts) into `dest` and read it."""
    if isinstance(ref, str):
        ref = resolve_version(client, ref)
    dest.mkdir(parents=True, exist_ok=True)
    return OpenedVersion.read(download_version(client, ref, dest), ref)
