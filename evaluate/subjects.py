"""The version under test, its base model and the production version as `Subject`s, opened by core.version.

One base model is loaded once and carries both adapters (`model`, `production`); the base is measured with
adapters disabled. On CPUs each version is measured with its adapter merged into the weights
(`evaluate.merging`), and in bf16 the linear layers multiply by packed weights (`core.packed_linear`). Each
subject runs with its own version's manifest (chat template, system prompt, EOS). A production version trained
on a different base gets its own copy of that base.
"""

from __future__ import annotations

import logging

from core.device import DevicePref, DtypePref, choose_device, choose_dtype
from core.packed_linear import pack_linears, packing_applies
from core.version import OpenedVersion
from evaluate.merging import MergedAdapters
from evaluate.scoring import Subject

log = logging.getLogger(__name__)

MODEL, BASE, PROD = "model", "base", "production"


def _subject(label: str, model: object, adapter: str | None, version: OpenedVersion, tokenizer: object) -> Subject:
    manifest = version.manifest
    return Subject(
        label=label,
        model=model,
        adapter=adapter,
        tokenizer=tokenizer,  # type: ignore[arg-type]
        chat_template=manifest.chat_template,
        system_prompt=manifest.system_prompt,
        eos_ids=version.eos_ids(tokenizer),  # type: ignore[arg-type]
    )


def load_subjects(
    version: OpenedVersion,
    production: OpenedVersion | None,
    with_base: bool,
    device_pref: DevicePref = "auto",
    dtype_pref: DtypePref = "auto",
) -> dict[str, Subject]:
    """Subjects keyed `model`, `base` (when asked) and `production` (when given), ready to score."""
    device = choose_device(device_pref)
    dtype = choose_dtype(dtype_pref, device)
    base_ref = version.base()
    tokenizer = version.tokenizer()
    peft_model = version.attach(version.load_base(device, dtype), MODEL).eval()

    out = {MODEL: _subject(MODEL, peft_model, MODEL, version, tokenizer)}
    if with_base:
        out[BASE] = _subject(BASE, peft_model, None, version, tokenizer)
    if production is not None:
        if production.manifest.base_digest == base_ref.digest:
            out[PROD] = _subject(PROD, production.attach(peft_model, PROD), PROD, production, tokenizer)
        else:
            log.info("production %s uses another base model; loading it separately", production.label)
            prod_model = production.attach(production.load_base(device, dtype), PROD).eval()
            out[PROD] = _subject(PROD, prod_model, PROD, production, production.tokenizer())
    models = {id(s.model): s.model for s in out.values()}  # one base in memory, or two; every adapter attached
    if packing_applies(dtype, device):
        for model in models.values():
            pack_linears(model)
    mergers = {key: MergedAdapters(model) for key, model in models.items() if MergedAdapters.applies(model)}
    for subject in out.values():
        subject.merged = mergers.get(id(subject.model))
    if mergers:
        log.info("evaluation: each version's adapter merged into the weights while it is measured")
    return out
