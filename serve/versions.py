"""Which registry version each model name serves, loading adapters onto the engine and following alias moves.

`NAME` is the `production` alias, `NAME@ALIAS` any alias, `NAME/VERSION` a pinned version; only models named
in the settings are served, and nothing ever falls back to the bare base model. A watched alias switches to a
new version only after that version loaded and answered a warm-up generation; the switch is one dict
assignment, so requests already admitted finish on the version they started with. A version that fails
keeps the old one serving and is not retried until its alias moves again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ModelError, TuneopsError
from core.registry import PRODUCTION, REF, Manifest
from core.version import OpenedVersion, open_version
from serve.engine import Engine, Failed, Finished, Job, SamplingParams
from serve.errors import APIError, ModelNotFound, NotReady
from serve.metrics import Metrics
from serve.settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """A loaded, checked version: what a request needs to run on it."""

    model: str
    version: str
    adapter: str
    manifest: Manifest
    eos_ids: frozenset[int]

    @property
    def labels(self) -> tuple[str, str]:
        return self.model, self.version


class VersionDirectory:
    def __init__(self, settings: ServeSettings, engine: Engine, metrics: Metrics, workdir: Path) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.workdir = workdir
        self.client: Any = None
        self.base: Any = None  # core.models.BaseModelRef of the one base every version must share
        self.tokenizer: Any = None  # for encoding on the event loop; the engine decodes with its own copy
        self.max_model_len = 0
        self._aliases: dict[tuple[str, str], Served] = {}
        self._versions: dict[tuple[str, str], Served] = {}
        self._failed: dict[tuple[str, str], str] = {}
        self._used: dict[tuple[str, str], float] = {}
        self._opened: dict[tuple[str, str], OpenedVersion] = {}
        self._load_lock = threading.Lock()
        self.started = False

    # lookups --------------------------------------------------------------------------------------

    def lookup(self, ref: str) -> Served | None:
        """The fast path: a name already served, without touching the registry."""
        m = REF.match(ref)
        if not m or m["name"] not in self.settings.models:
            raise ModelNotFound(ref)
        key = (m["name"], m["version"]) if m["version"] else None
        served = self._versions.get(key) if key else self._aliases.get((m["name"], m["alias"] or PRODUCTION))
        if served is not None:
            self._used[(served.model, served.version)] = time.monotonic()
        return served

    def resolve(self, ref: str) -> Served:
        """Any accepted spelling -> a served version, loaded on first use (blocking: call off the loop)."""
        served = self.lookup(ref)
        if served is not None:
            return served
        if self.base is None:
            raise NotReady("no version is loaded yet")
        m = REF.match(ref)
        assert m is not None
        name = m["name"]
        if m["version"]:
            version = m["version"]
            try:
                self.client.get_model_version(name, version)
            except Exception:
                raise ModelNotFound(ref, "has no such version") from None
        else:
            alias = m["alias"] or PRODUCTION
            version = self._alias_target(name, alias)
            if version is None:
                raise ModelNotFound(ref, f"has no alias '{alias}'")
        if (name, version) in self._failed:
            raise ModelNotFound(ref, f"cannot be served: version {version} failed to load")
        try:
            served = self._load(name, version)
        except APIError:
            raise
        except Exception as exc:  # logged here; the client learns which version and why, briefly
            log.error("%s: version %s failed to load: %s", ref, version, exc)
            raise ModelNotFound(ref, f"cannot be served: version {version} failed to load") from None
        if not m["version"]:
            self._switch(name, m["alias"] or PRODUCTION, served)
        return served

    def listing(self) -> list[tuple[str, str, int]]:
        """(id, parent base model, created) for every servable version and alias of the served models."""
        from core.registry import servable_versions

        out: list[tuple[str, str, int]] = []
        for name in self.settings.models:
            try:
                refs = servable_versions(self.client, name)
            except Exception as exc:
                log.warning("cannot list versions of %s: %s", name, exc)
                continue
            aliases: dict[str, list[str]] = {}
            for alias, version in (self.client.get_registered_model(name).aliases or {}).items():
                aliases.setdefault(str(version), []).append(alias)
            for ref in sorted(refs, key=lambda r: int(r.version)):
                try:
                    manifest = self._open(name, ref.version).manifest
                except TuneopsError:
                    continue  # not a tuneops version, so not servable
                mv = self.client.get_model_version(name, ref.version)
                created = int((mv.creation_timestamp or 0) / 1000)
                out.append((f"{name}/{ref.version}", manifest.base_model, created))
                for alias in sorted(aliases.get(ref.version, [])):
                    out.append((name if alias == PRODUCTION else f"{name}@{alias}", manifest.base_model, created))
        return out

    def ready(self) -> bool:
        return self.started and any((m, PRODUCTION) in self._aliases for m in self.settings.models)

    # loading --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, then load each model's production version (failures are logged; polling retries)."""
        from core.registry import connect

        self.client = connect(self.settings.tracking_uri)
        for name in self.settings.models:
            self._follow(name, PRODUCTION)
        self.started = True

    def refresh(self) -> None:
        """One poll: follow every watched alias (and production of models not loaded yet)."""
        keys = set(self._aliases) | {(m, PRODUCTION) for m in self.settings.models}
        for name, alias in sorted(keys):
            self._follow(name, alias)

    def _follow(self, name: str, alias: str) -> None:
        try:
            version = self._alias_target(name, alias)
        except Exception as exc:
            log.warning("registry poll for %s@%s failed: %s", name, alias, exc)
            return
        current = self._aliases.get((name, alias))
        if version is None or (current is not None and current.version == version):
            return
        if (name, version) in self._failed:
            return
        log.info("%s@%s -> version %s: loading", name, alias, version)
        try:
            served = self._load(name, version)
        except Exception as exc:
            self.metrics.promotions.labels(name, alias, "failure").inc()
            keep = f"; still serving version {current.version}" if current else ""
            log.error("%s@%s: version %s failed to load%s: %s", name, alias, version, keep, exc)
            return
        self._switch(name, alias, served)
        self.metrics.promotions.labels(name, alias, "success").inc()

    def _switch(self, name: str, alias: str, served: Served) -> None:
        previous = self._aliases.get((name, alias))
        self._aliases[(name, alias)] = served  # atomic: new requests resolve to the new version from here on
        self.metrics.served_version.labels(name, alias).set(int(served.version))
        log.info(
            "%s@%s now serves version %s%s",
            name,
            alias,
            served.version,
            f" (was {previous.version})" if previous else "",
        )

    def _alias_target(self, name: str, alias: str) -> str | None:
        from core.registry import current_alias

        return current_alias(self.client, name, alias)

    def _open(self, name: str, version: str) -> OpenedVersion:
        """The version downloaded into the work folder, once."""
        key = (name, version)
        if key not in self._opened:
            dest = self.workdir / re.sub(r"[^A-Za-z0-9_.-]", "_", name) / version
            self._opened[key] = open_version(self.client, f"{name}/{version}", dest)
        return self._opened[key]

    def _load(self, name: str, version: str) -> Served:
        """Download, check the base, load the adapter, and generate once; raises (and records) on failure."""
        with self._load_lock:
            if (name, version) in self._versions:
                return self._versions[(name, version)]
            adapter = re.sub(r"[^A-Za-z0-9_]", "_", f"{name}__v{version}")
            try:
                opened = self._open(name, version)
                self._ensure_base(opened)
                self.engine.call(lambda: self.engine.add_adapter(adapter, opened.adapter_path)).result(
                    self.settings.load_timeout_s
                )
                eos_ids = frozenset(opened.eos_ids(self.tokenizer))
                served = Served(name, version, adapter, opened.manifest, eos_ids)
                self._warm(served)
            except Exception as exc:
                self._failed[(name, version)] = str(exc)
                self.metrics.adapter_loads.labels(name, version, "failure").inc()
                with contextlib.suppress(Exception):
                    self.engine.call(lambda: self.engine.remove_adapter(adapter)).result(30)
                raise
            self.metrics.adapter_loads.labels(name, version, "success").inc()
            self._versions[(name, version)] = served
            self._used[(name, version)] = time.monotonic()
            self._evict(keep=(name, version))
            log.info("loaded %s/%s as adapter %s", name, version, adapter)
            return served

    def _ensure_base(self, opened: OpenedVersion) -> None:
        """The first version decides the base; every later one must have been trained on the same weights."""
        if self.base is not None:
            opened.check_base(self.base)
            return
        import torch

        from core.device import choose_device, choose_dtype

        base = opened.base()
        device = choose_device(self.settings.device)
        dtype = choose_dtype(self.settings.dtype, device)
        threads = self.settings.cpu_threads

        def load() -> None:
            if device.type == "cpu":
                torch.set_num_threads(threads)
            self.engine.load_base(opened.load_base(device, dtype).eval(), opened.tokenizer(), device)

        self.engine.call(load).result(self.settings.load_timeout_s)
        self.tokenizer = opened.tokenizer()
        config = self.engine.base.config
        self.max_model_len = self.settings.limits.max_model_len or int(getattr(config, "max_position_embeddings", 2048))
        self.base = base
        log.info("base model %s on %s in %s", base.name, device, dtype)

    def _warm(self, served: Served) -> None:
        """Generate through the engine, like a request would; the version serves only if this works."""
        from core.chat import prompt_ids

        ids = prompt_ids(
            self.tokenizer,
            [{"role": "user", "content": self.settings.warmup_prompt}],
            served.manifest.chat_template,
            served.manifest.system_prompt,
        )
        done = threading.Event()
        outcome: list[Any] = []

        def sink(event: Any) -> None:
            if isinstance(event, Finished | Failed):
                outcome.append(event)
                done.set()

        job = Job(
            served.adapter,
            ids,
            SamplingParams(max_tokens=2, temperature=0.0),
            served.eos_ids,
            sink,
            served.labels,
        )
        self.engine.submit(job, 1)
        if not done.wait(self.settings.load_timeout_s):
            job.cancelled = True
            raise ModelError("the warm-up generation timed out")
        if isinstance(outcome[0], Failed):
            raise ModelError(f"the warm-up generation failed: {outcome[0].error.message}")

    def _evict(self, keep: tuple[str, str]) -> None:
        """Unload least recently used versions beyond the limit; alias targets and `keep` (just loaded) stay."""
        pinned = {(s.model, s.version) for s in self._aliases.values()} | {keep}
        while len(self._versions) > self.settings.max_loaded_adapters:
            spare = [k for k in self._versions if k not in pinned]
            if not spare:
                return
            key = min(spare, key=lambda k: self._used.get(k, 0.0))
            served = self._versions.pop(key)
            removed = self.engine.call(functools.partial(self.engine.remove_adapter, served.adapter)).result(30)
            if not removed:
                self._versions[key] = served
                return
            log.info("unloaded %s/%s (least recently used)", *key)
