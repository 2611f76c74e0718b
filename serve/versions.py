"""Which registry version each model name serves, loading adapters onto the engine and following alias moves.

`NAME` is the `production` alias, `NAME@ALIAS` any alias, `NAME/VERSION` a pinned version; only models named
in the settings are served, and nothing ever falls back to the bare base model. Which pinned versions a client
may name is the operator's choice (`expose`): none, those whose evaluation passed or that an alias points at
(the default), or all.

A watched alias switches to a new version only after that version loaded and answered a warm-up generation;
the switch is one dict assignment, so requests already admitted finish on the version they started with. The
warm-up runs on the engine thread between decode steps, not in the users' queue, so a busy gateway switches as
fast as an idle one. A version that fails keeps the old one serving, shows as behind (readiness body, metrics)
and is tried again with exponential backoff.

Only loaded versions keep anything: their downloaded folder goes when they are unloaded or fail, the failure
record is bounded, and listing reads registry metadata without downloading.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.aliases import PASS, VERDICT_TAG
from core.errors import ModelError
from core.registry import BASE_MODEL_TAG, PRODUCTION, REF, Manifest
from core.version import OpenedVersion, open_version
from serve.engine import Engine
from serve.errors import APIError, ModelNotFound, NotReady
from serve.metrics import Metrics
from serve.settings import ServeSettings

log = logging.getLogger(__name__)

MAX_VERSION = 2**31 - 1  # beyond any registry's count; larger numbers overflow MLflow's integer column
FAILURES_KEPT = 64
WARMUP_TOKENS = 2

Key = tuple[str, str]  # (model name, version)


@dataclass(frozen=True)
class Served:
    """A loaded, checked version: what a request needs to run on it."""

    model: str
    version: str
    adapter: str
    manifest: Manifest
    eos_ids: frozenset[int]
    folder: Path | None = None  # its downloaded files, deleted when it is unloaded

    @property
    def labels(self) -> tuple[str, str]:
        return self.model, self.version


@dataclass(frozen=True)
class Failure:
    """Why a version's last load failed, how many tries failed in a row, and when (monotonic) to try again."""

    reason: str
    attempts: int
    retry_at: float


class FailureLog:
    """Versions whose last load failed, each retried after a wait that doubles from `first_s` up to `max_s`.

    At most `keep` records: the oldest is forgotten first, so at worst a forgotten version is tried early.
    """

    def __init__(self, first_s: float, max_s: float, keep: int = FAILURES_KEPT) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.keep = keep
        self._items: collections.OrderedDict[Key, Failure] = collections.OrderedDict()
        self._lock = threading.Lock()

    def record(self, key: Key, reason: str) -> Failure:
        with self._lock:
            previous = self._items.pop(key, None)
            attempts = previous.attempts + 1 if previous else 1
            wait = min(self.max_s, self.first_s * 2 ** min(attempts - 1, 60))
            failure = Failure(reason, attempts, time.monotonic() + wait)
            self._items[key] = failure
            while len(self._items) > self.keep:
                self._items.popitem(last=False)
            return failure

    def get(self, key: Key) -> Failure | None:
        return self._items.get(key)

    def due(self, key: Key) -> bool:
        """True when the version never failed, or its wait is over."""
        failure = self._items.get(key)
        return failure is None or time.monotonic() >= failure.retry_at

    def clear(self, key: Key) -> None:
        with self._lock:
            self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


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
        self._aliases: dict[Key, Served] = {}  # (name, alias) -> what it serves
        self._versions: dict[Key, Served] = {}
        self._failures = FailureLog(settings.poll_interval_s, settings.retry_max_backoff_s)
        self._behind: dict[Key, str] = {}  # (name, alias) -> the version it points at but cannot serve yet
        self._used: dict[Key, float] = {}
        self._exposed_at: dict[Key, float] = {}  # when the registry last said a loaded version may be named
        self._load_lock = threading.Lock()
        self.started = False
        metrics.num_failed_versions.set_function(lambda: len(self._failures))

    # lookups --------------------------------------------------------------------------------------

    def parse(self, ref: str) -> tuple[str, str | None, str | None]:
        """(name, alias, version) of a spelling clients may use; the version normalised (`02` is `2`).

        Refuses, without the registry, names not served, version numbers when only aliases are exposed, and
        numbers no version can have (0, absurdly large, non-ASCII digits).
        """
        m = REF.match(ref)
        if not m or m["name"] not in self.settings.models:
            raise ModelNotFound(ref)
        if m["version"] is None:
            return m["name"], m["alias"] or PRODUCTION, None
        if self.settings.expose == "aliases":
            raise ModelNotFound(ref, "is not served by version number here: name an alias (NAME or NAME@ALIAS)")
        digits = m["version"].lstrip("0")
        if not digits.isascii() or not digits or len(digits) > len(str(MAX_VERSION)) or int(digits) > MAX_VERSION:
            raise ModelNotFound(ref, "has no such version")
        return m["name"], None, str(int(digits))

    def lookup(self, ref: str) -> Served | None:
        """The fast path: a name already served, without touching the registry."""
        name, alias, version = self.parse(ref)
        if version is None:
            served = self._aliases.get((name, alias or PRODUCTION))
        else:
            served = self._versions.get((name, version))
            if served is not None and not self._still_exposed((name, version)):
                served = None  # resolve asks the registry again
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
        name, alias, version = self.parse(ref)
        if version is not None:
            mv = self._registered(ref, name, version)
            if not self._exposed(mv.tags or {}, bool(mv.aliases)):
                raise ModelNotFound(
                    ref, f"is not exposed here: version {version} has no passing evaluation and no alias"
                )
        else:
            target = self._alias_target(name, alias or PRODUCTION)
            if target is None:
                raise ModelNotFound(ref, f"has no alias '{alias}'")
            version = target
        failure = self._failures.get((name, version))
        if failure is not None and not self._failures.due((name, version)):
            wait = max(0.0, failure.retry_at - time.monotonic())
            raise ModelNotFound(ref, f"cannot be served: version {version} failed to load (next try in {wait:.0f} s)")
        try:
            served = self._load(name, version)
        except APIError:
            raise
        except Exception as exc:  # logged here; the client learns which version and why, briefly
            log.error("%s: version %s failed to load: %s", ref, version, exc)
            raise ModelNotFound(ref, f"cannot be served: version {version} failed to load") from None
        if alias is None:
            self._exposed_at[(name, version)] = time.monotonic()
        else:
            self._switch(name, alias, served)
        return served

    def listing(self) -> list[tuple[str, str, int]]:
        """(id, parent base model, created) for what clients may name, from registry metadata only.

        Nothing is downloaded: the base is the `tuneops.base_model` tag a fine-tune job sets at registration
        (or the manifest of a loaded version). A version with neither was not made by tuneops and is skipped,
        as is a version that failed to load; a registry error skips that model, never fails the listing.
        """
        out: list[tuple[str, str, int]] = []
        for name in self.settings.models:
            try:
                versions = self._all_versions(name)
                aliases = self.client.get_registered_model(name).aliases or {}
            except Exception as exc:
                log.warning("cannot list versions of %s: %s", name, exc)
                continue
            by_version: dict[str, list[str]] = {}
            for alias, version in aliases.items():
                by_version.setdefault(str(version), []).append(alias)
            for mv in sorted(versions, key=lambda mv: int(mv.version)):
                version = str(mv.version)
                tags = mv.tags or {}
                loaded = self._versions.get((name, version))
                base = tags.get(BASE_MODEL_TAG) or (loaded.manifest.base_model if loaded else None)
                if not base:
                    continue
                created = int((mv.creation_timestamp or 0) / 1000)
                named = by_version.get(version, [])
                failed = self._failures.get((name, version)) is not None
                if self.settings.expose != "aliases" and not failed and self._exposed(tags, bool(named)):
                    out.append((f"{name}/{version}", base, created))
                for alias in sorted(named):
                    out.append((name if alias == PRODUCTION else f"{name}@{alias}", base, created))
        return out

    def ready(self) -> bool:
        return self.started and any((m, PRODUCTION) in self._aliases for m in self.settings.models)

    def behind(self) -> dict[str, dict[str, Any]]:
        """Watched aliases whose registry target failed to load: what they serve instead, why, when retried."""
        now = time.monotonic()
        out: dict[str, dict[str, Any]] = {}
        for (name, alias), version in sorted(self._behind.items()):
            current = self._aliases.get((name, alias))
            failure = self._failures.get((name, version))
            out[name if alias == PRODUCTION else f"{name}@{alias}"] = {
                "serving": current.version if current else None,
                "target": version,
                "error": failure.reason if failure else None,
                "attempts": failure.attempts if failure else 0,
                "retry_in_s": round(max(0.0, failure.retry_at - now), 1) if failure else 0.0,
            }
        return out

    def _exposed(self, tags: dict[str, str], aliased: bool) -> bool:
        """Whether the exposure setting lets clients name this version by number."""
        if self.settings.expose == "any":
            return True
        if self.settings.expose == "aliases":
            return False
        return aliased or tags.get(VERDICT_TAG) == PASS

    def _still_exposed(self, key: Key) -> bool:
        """A loaded version may still be named without asking the registry: any version under `any`, an alias
        target, or one the registry allowed within the last poll interval (aliases move, verdicts change)."""
        if self.settings.expose == "any" or any((s.model, s.version) == key for s in self._aliases.values()):
            return True
        checked = self._exposed_at.get(key)
        return checked is not None and time.monotonic() - checked < self.settings.poll_interval_s

    def _registered(self, ref: str, name: str, version: str) -> Any:
        """The registry's record of a version: one call; 404 when it has none, 503 when it cannot say."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(name, version)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise ModelNotFound(ref, "has no such version") from None
            log.warning("registry lookup of %s failed: %s", ref, exc)
            raise NotReady("The model registry did not answer; retry.") from None
        except Exception as exc:
            log.warning("registry lookup of %s failed: %s", ref, exc)
            raise NotReady("The model registry did not answer; retry.") from None

    def _all_versions(self, name: str) -> list[Any]:
        found: list[Any] = []
        token = None
        while True:
            page = self.client.search_model_versions(f"name = '{name}'", page_token=token)
            found.extend(page)
            token = getattr(page, "token", None)
            if not token:
                return found

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
            self._set_behind(name, alias, None)
            return
        if not self._failures.due((name, version)):
            self._set_behind(name, alias, version)
            return  # failed recently; tried again when its wait is over
        log.info("%s@%s -> version %s: loading", name, alias, version)
        try:
            served = self._load(name, version)
        except Exception as exc:
            self.metrics.promotions.labels(name, alias, "failure").inc()
            self._set_behind(name, alias, version)
            failure = self._failures.get((name, version))
            keep = f"; still serving version {current.version}" if current else ""
            again = f"; next try in {failure.retry_at - time.monotonic():.0f} s" if failure else ""
            log.error("%s@%s: version %s failed to load%s%s: %s", name, alias, version, keep, again, exc)
            return
        self._switch(name, alias, served)
        self.metrics.promotions.labels(name, alias, "success").inc()

    def _set_behind(self, name: str, alias: str, version: str | None) -> None:
        if version is None:
            if self._behind.pop((name, alias), None) is not None:
                self.metrics.alias_behind.labels(name, alias).set(0)
        else:
            self._behind[(name, alias)] = version
            self.metrics.alias_behind.labels(name, alias).set(1)

    def _switch(self, name: str, alias: str, served: Served) -> None:
        previous = self._aliases.get((name, alias))
        self._aliases[(name, alias)] = served  # atomic: new requests resolve to the new version from here on
        self._set_behind(name, alias, None)
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

    def _folder(self, name: str, version: str) -> Path:
        return self.workdir / re.sub(r"[^A-Za-z0-9_.-]", "_", name) / version

    def _load(self, name: str, version: str) -> Served:
        """Download, check the base, load the adapter, and generate once; raises (and records) on failure."""
        key = (name, version)
        with self._load_lock:
            if key in self._versions:
                return self._versions[key]
            adapter = re.sub(r"[^A-Za-z0-9_]", "_", f"{name}__v{version}")
            folder = self._folder(name, version)
            try:
                shutil.rmtree(folder, ignore_errors=True)  # never a stale half-download
                opened = open_version(self.client, f"{name}/{version}", folder)
                self._ensure_base(opened)
                self._on_engine(
                    functools.partial(self.engine.add_adapter, adapter, opened.adapter_path), "loading the adapter"
                )
                eos_ids = frozenset(opened.eos_ids(self.tokenizer))
                served = Served(name, version, adapter, opened.manifest, eos_ids, folder)
                self._warm(served)
            except Exception as exc:
                self._failures.record(key, str(exc) or type(exc).__name__)
                self.metrics.adapter_loads.labels(name, version, "failure").inc()
                with contextlib.suppress(Exception):
                    self.engine.call(lambda: self.engine.remove_adapter(adapter)).result(30)
                shutil.rmtree(folder, ignore_errors=True)
                raise
            self._failures.clear(key)
            self.metrics.adapter_loads.labels(name, version, "success").inc()
            self._versions[key] = served
            self._used[key] = time.monotonic()
            self._evict(keep=key)
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

        self._on_engine(load, "loading the base model")
        self.tokenizer = opened.tokenizer()
        config = self.engine.base.config
        self.max_model_len = self.settings.limits.max_model_len or int(getattr(config, "max_position_embeddings", 2048))
        self.base = base
        log.info("base model %s on %s in %s", base.name, device, dtype)

    def _warm(self, served: Served) -> None:
        """The version serves only if it answers a short greedy generation on its chat template.

        It runs through `Engine.call`, between decode steps, rather than as a queued request: behind a full
        queue a warm-up would time out and a promotion would never take effect while the gateway is busy.
        """
        from core.chat import prompt_ids

        ids = prompt_ids(
            self.tokenizer,
            [{"role": "user", "content": self.settings.warmup_prompt}],
            served.manifest.chat_template,
            served.manifest.system_prompt,
        )
        self._on_engine(
            functools.partial(self.engine.probe, served.adapter, ids, WARMUP_TOKENS), "the warm-up generation"
        )

    def _on_engine(self, fn: Any, what: str) -> Any:
        """Run a step of a load on the engine thread; one that outlasts load_timeout_s fails the load, saying so."""
        try:
            return self.engine.call(fn).result(self.settings.load_timeout_s)
        except TimeoutError:
            raise ModelError(f"{what} took longer than {self.settings.load_timeout_s:g} s") from None

    def _evict(self, keep: Key) -> None:
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
            self._used.pop(key, None)
            self._exposed_at.pop(key, None)
            if served.folder is not None:
                shutil.rmtree(served.folder, ignore_errors=True)
            log.info("unloaded %s/%s (least recently used)", *key)
