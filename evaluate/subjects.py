"""Load the version under test, its base model and the production version as `Subject`s.

One base model is loaded once and carries both adapters (`model`, `production`); the base is measured with
adapters disabled. A production version trained on a different base gets its own copy of that base.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.device import DevicePref, DtypePref, choose_device, choose_dtype
from core.errors import ModelError
from core.models import load_causal_lm, load_tokenizer, resolve_base_model
from core.registry import ADAPTER_DIR, MANIFEST_FILE, Manifest, VersionRef, download_version
from evaluate.scoring import Subject

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

MODEL, BASE, PROD = "model", "base", "production"


@dataclass
class Bundle:
    """A downloaded version: its manifest and the folder holding the adapter."""

    ref: VersionRef
    manifest: Manifest
    root: Path


def fetch(client: MlflowClient, ref: VersionRef, dest: Path) -> Bundle:
    root = download_version(client, ref, dest)
    return Bundle(ref, Manifest.read(root / MANIFEST_FILE), root)


def _eos_ids(tokenizer: object, manifest: Manifest) -> list[int]:
    """The manifest's EOS first (the answer terminator that is scored), then the tokenizer's own."""
    ids = [tokenizer.convert_tokens_to_ids(manifest.eos_token)]  # type: ignore[attr-defined]
    own = getattr(tokenizer, "eos_token_id", None)
    if own is not None and own not in ids:
        ids.append(own)
    return [i for i in ids if isinstance(i, int) and i >= 0]


def load_subjects(
    bundle: Bundle,
    production: Bundle | None,
    with_base: bool,
    device_pref: DevicePref = "auto",
    dtype_pref: DtypePref = "auto",
) -> dict[str, Subject]:
    """Subjects keyed `model`, `base` (when asked) and `production` (when given), ready to score."""
    from peft import PeftModel

    device = choose_device(device_pref)
    dtype = choose_dtype(dtype_pref, device)
    manifest = bundle.manifest
    base_ref = resolve_base_model(manifest.base_model)
    if manifest.base_digest and base_ref.digest != manifest.base_digest:
        raise ModelError(
            f"base model {base_ref.name} has digest {base_ref.digest}, but {bundle.ref.label} was trained on "
            f"{manifest.base_digest}"
        )
    tokenizer = load_tokenizer(bundle.root / ADAPTER_DIR)
    log.info("loading %s on %s in %s", base_ref.name, device, dtype)
    base = load_causal_lm(base_ref, device, dtype)
    peft_model = PeftModel.from_pretrained(base, bundle.root / ADAPTER_DIR, adapter_name=MODEL).eval()

    def subject(
        label: str, model: object, adapter: str | None, tok: object = tokenizer, man: Manifest = manifest
    ) -> Subject:
        return Subject(
            label=label,
            model=model,
            adapter=adapter,
            tokenizer=tok,  # type: ignore[arg-type]
            chat_template=man.chat_template,
            system_prompt=man.system_prompt,
            eos_ids=_eos_ids(tok, man),
        )

    out = {MODEL: subject(MODEL, peft_model, MODEL)}
    if with_base:
        out[BASE] = subject(BASE, peft_model, None)
    if production is not None:
        if production.manifest.base_digest == manifest.base_digest:
            peft_model.load_adapter(str(production.root / ADAPTER_DIR), adapter_name=PROD)
            out[PROD] = subject(PROD, peft_model, PROD)
        else:
            log.info("production %s uses another base model; loading it separately", production.ref.label)
            other = load_causal_lm(resolve_base_model(production.manifest.base_model), device, dtype)
            prod_model = PeftModel.from_pretrained(other, production.root / ADAPTER_DIR, adapter_name=PROD)
            prod_tokenizer = load_tokenizer(production.root / ADAPTER_DIR)
            out[PROD] = subject(PROD, prod_model.eval(), PROD, prod_tokenizer, production.manifest)
    return out
