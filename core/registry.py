"""The MLflow registry contract that every stage shares.

A fine-tune run logs an adapter plus a manifest (base model name and digest, chat template, EOS, library
versions) as a pyfunc model and registers it. Versions are addressed as `NAME` (its `production` alias),
`NAME@ALIAS`, `NAME/VERSION` or a run id. Aliases move only through `core.aliases`, which records every move.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import RegistryError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

PRODUCTION = "production"
CANDIDATE = "candidate"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MANIFEST_FILE = "manifest.json"
BASE_MODEL_TAG = "tuneops.base_model"  # on every registered version: listing needs no download
ADAPTER_DIR = "adapter"
RUN_ID = re.compile(r"^[0-9a-f]{32}\Z")
# \Z, not $: a reference never ends in a newline; [0-9], not \d: only ASCII digits are version numbers.
REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[0-9]+))?\Z")


def tracking_uri(configured: str | None = None) -> str:
    """Config first, then MLFLOW_TRACKING_URI, then a local SQLite file."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect(configured: str | None = None) -> MlflowClient:
    """Point MLflow at the tracking store, failing fast and clearly when a server does not answer."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(configured)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise RegistryError(f"tracking server {uri} is unreachable: {exc}") from exc
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if uri.startswith(("http://", "https://")):
        _check_credentials(client, uri)
    return client


def _check_credentials(client: MlflowClient, uri: str) -> None:
    """A server with authentication says 401 to every call; say it once, here, not as "no such model" later."""
    from mlflow.exceptions import MlflowException

    try:
        client.search_experiments(max_results=1)
    except MlflowException as exc:
        if exc.error_code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            raise
        who = os.environ.get("MLFLOW_TRACKING_USERNAME")
        raise RegistryError(
            f"tracking server {uri} refused {'user ' + repr(who) if who else 'anonymous access'}: "
            "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        ) from None


@dataclass
class Manifest:
    """What a served or evaluated version needs besides its adapter; the base is referenced, never copied."""

    base_model: str
    base_digest: str
    chat_template: str | None
    eos_token: str
    system_prompt: str | None = None
    max_length: int = 512
    config_hash: str = ""
    job_name: str = ""
    libraries: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def library_versions() -> dict[str, str]:
    names = ["tuneops", "torch", "transformers", "peft", "accelerate", "datasets", "mlflow"]
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except OSError:
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


@dataclass(frozen=True)
class VersionRef:
    """A registered version resolved from any of the accepted spellings."""

    name: str
    version: str
    run_id: str
    source: str
    aliases: tuple[str, ...]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


def _ref(mv: ModelVersion) -> VersionRef:
    return VersionRef(mv.name, str(mv.version), mv.run_id or "", mv.source or "", tuple(mv.aliases or ()))


def resolve_version(client: MlflowClient, ref: str) -> VersionRef:
    """`NAME` (production alias), `NAME@ALIAS`, `NAME/VERSION` or a run id -> the model version."""
    from mlflow.exceptions import MlflowException

    if RUN_ID.match(ref):
        found = client.search_model_versions(f"run_id = '{ref}'")
        if not found:
            raise RegistryError(f"run {ref} registered no model version")
        return _ref(found[0])
    m = REF.match(ref)
    if not m:
        raise RegistryError(f"'{ref}' is not a model reference: use NAME, NAME@ALIAS, NAME/VERSION or a run id")
    name, alias, version = m["name"], m["alias"], m["version"]
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model named '{name}'") from None
    try:
        if version is not None:
            return _ref(client.get_model_version(name, version))
        return _ref(client.get_model_version_by_alias(name, alias or PRODUCTION))
    except MlflowException:
        what = f"version {version}" if version else f"alias '{alias or PRODUCTION}'"
        raise RegistryError(f"model '{name}' has no {what}") from None


def download_version(client: MlflowClient, ref: VersionRef, dest: Path | None = None) -> Path:
    """Fetch a version's artifacts; returns the folder holding `manifest.json` and `adapter/`."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.source, dst_path=str(dest) if dest else None))
    # pyfunc `artifacts={"bundle": folder}` lands under artifacts/<folder name>/, whatever its name.
    candidates = [local / "artifacts", local, *sorted((local / "artifacts").glob("*/"))]
    for folder in candidates:
        if (folder / MANIFEST_FILE).is_file():
            return folder
    raise RegistryError(f"{ref.label} has no {MANIFEST_FILE}: not a tuneops model version")


def actor() -> str:
    """Who runs a job or moves an alias: TUNEOPS_ACTOR, else the login name (the password database as root)."""
    configured = os.environ.get("TUNEOPS_ACTOR")
    if configured:
        return configured
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a uid with no password entry, as in some containers
        return f"uid {os.getuid()}"


def current_alias(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def servable_versions(client: MlflowClient, name: str) -> list[VersionRef]:
    return [_ref(mv) for mv in client.search_model_versions(f"name = '{name}'")]
