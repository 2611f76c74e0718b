"""Shared fixtures: a tiny random model on the real tokenizer, a temporary MLflow store (SQLite, or PostgreSQL behind
an MLflow server), registered versions."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from core.registry import VersionRef

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
def smollm2_tokenizer():
    """SmolLM2's tokenizer without converting its weights: read from the GGUF once, then kept in the cache."""
    from transformers import AutoTokenizer

    from core.models import CATALOGUE, _gguf_path, cache_dir, load_tokenizer

    entry = CATALOGUE["smollm2-135m-instruct"]
    gguf = _gguf_path(entry)
    folder = cache_dir() / "tokenizers" / f"{entry.name}-{gguf.stat().st_size}"
    if not (folder / "tokenizer_config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        try:
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
            with contextlib.suppress(OSError):  # another test process got there first
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(folder)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template: fast, but real shapes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer
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


def _use_store(uri: str, mp: pytest.MonkeyPatch) -> None:
    import mlflow

    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


class TrackingServer:
    """A private PostgreSQL + `mlflow server` (tuneops.stack) for the test session, emptied before each test."""

    def __init__(self, folder: Path) -> None:
        from test_serve_support import free_port

        from tuneops.stack import Stack

        self.stack = Stack(folder, port=free_port(), pg_port=free_port(), workers=2)
        self.uri = self.stack.tracking_uri
        self.pristine: list[str] = []

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.stack.database_uri().replace("+psycopg", ""), autocommit=True)

    def snapshot(self) -> None:
        """Keep a copy of what a fresh server holds (the default experiment, ...) in a `pristine` schema."""
        with self._connect() as conn:
            conn.execute("DROP SCHEMA IF EXISTS pristine CASCADE")
            conn.execute("CREATE SCHEMA pristine")
            for table in self._tables(conn):
                row = conn.execute(f'SELECT count(*) FROM public."{table}"').fetchone()
                if row and row[0]:
                    conn.execute(f'CREATE TABLE pristine."{table}" AS SELECT * FROM public."{table}"')
                    self.pristine.append(table)

    def reset(self) -> None:
        """Back to the snapshot: what one test registered is invisible to the next, as with a new SQLite file."""
        with self._connect() as conn:
            tables = self._tables(conn)
            names = ", ".join(f'public."{t}"' for t in tables)
            conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
            conn.execute("SET session_replication_role = replica")  # restore rows in any order
            for table in self.pristine:
                conn.execute(f'INSERT INTO public."{table}" SELECT * FROM pristine."{table}"')

    @staticmethod
    def _tables(conn: Any) -> list[str]:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        ).fetchall()
        return sorted(r[0] for r in rows)


@pytest.fixture(scope="session")
def tracking_server() -> Iterator[TrackingServer]:
    """PostgreSQL (installed with apt when missing and we are root) and an MLflow server on it, on free ports.

    Skips only when PostgreSQL cannot be installed; any other failure to start is a test failure.
    """
    from tuneops.stack import StackError, install_postgres

    try:
        install_postgres()
    except StackError as exc:
        pytest.skip(f"PostgreSQL-backed MLflow server unavailable: {exc}")
    folder = Path(tempfile.mkdtemp(prefix="tuneops-stack-"))
    folder.chmod(0o755)  # as root the cluster belongs to the `postgres` user, who must enter this folder
    server = TrackingServer(folder / "stack")
    try:
        server.stack.up()
        server.snapshot()
        yield server
    finally:
        server.stack.down()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def mlflow_store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty tracking store; yields its URI. SQLite under tmp_path by default; parametrize it
    indirectly with "postgres" for the session's PostgreSQL-backed MLflow server (artifacts over HTTP)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    backend = getattr(request, "param", "sqlite")
    if backend == "postgres":
        server: TrackingServer = request.getfixturevalue("tracking_server")
        server.reset()
        uri = server.uri
    else:
        uri = f"sqlite:///{tmp_path}/mlflow.db"
    _use_store(uri, monkeypatch)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


class Publisher:
    """Registers versions of random LoRA adapters in one MLflow store: the one way tests make versions."""

    def __init__(self, uri: str, root: Path, base_dir: Path) -> None:
        self.uri = uri
        self.root = root
        self.base_dir = base_dir

    def publish(
        self,
        name: str = "tiny-model",
        seed: int = 0,
        *,
        base_dir: Path | None = None,
        system_prompt: str | None = None,
        base_digest: str | None = None,
        broken: str | None = None,
        alias: str | None = None,
        verdict: str | None = None,
    ) -> VersionRef:
        """Register a version; returns its VersionRef. `seed` changes the adapter weights, so two versions
        answer differently. `base_digest` overrides the recorded digest; `broken`: 'weights' writes garbage
        adapter weights, 'nan' NaN ones. `alias` points an alias at the new version. `verdict` sets the verdict
        tag an evaluation would leave (core.aliases.PASS, ...). Like a fine-tune job, the version is tagged with
        its base model."""
        import mlflow
        import torch
        from peft import LoraConfig, get_peft_model

        from core.models import load_causal_lm, load_tokenizer, weights_digest
        from core.pyfunc import publish_version, write_bundle
        from core.registry import Manifest, connect, resolve_version

        base_dir = base_dir or self.base_dir
        torch.manual_seed(seed)
        tokenizer = load_tokenizer(base_dir)
        base = load_causal_lm(base_dir, torch.device("cpu"), torch.float32)
        model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )
        if broken == "nan":
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.fill_(float("nan"))
        manifest = Manifest(
            base_model=str(base_dir),
            base_digest=weights_digest(base_dir) if base_digest is None else base_digest,
            chat_template=tokenizer.chat_template,
            eos_token=tokenizer.eos_token,
            system_prompt=system_prompt,
            max_length=512,
            job_name="test",
        )
        bundle = write_bundle(self.root / f"bundle-{name}-{seed}-{broken}", model, tokenizer, manifest)
        if broken == "weights":
            (bundle / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
        client = connect(self.uri)
        mlflow.set_experiment("tests")
        with mlflow.start_run():
            mv = publish_version(bundle, name, tags={"tuneops.base_model": str(base_dir)}, pip_requirements=["torch"])
        if verdict is not None:
            from core.aliases import VERDICT_TAG

            client.set_model_version_tag(name, str(mv.version), VERDICT_TAG, verdict)
        if alias:
            self.move(name, alias, str(mv.version))
        return resolve_version(client, f"{name}/{mv.version}")

    def artifacts(self, name: str, version: str) -> Path:
        """The folder in the store that holds a version's registered files (to break or repair them)."""
        from core.registry import connect

        client = connect(self.uri)
        mv = client.get_model_version(name, version)
        location = client.get_logged_model(mv.model_id or mv.source.removeprefix("models:/")).artifact_location
        return Path(location.removeprefix("file://"))

    def move(self, name: str, alias: str, version: str) -> None:
        from core.aliases import move_alias
        from core.registry import connect

        move_alias(connect(self.uri), name, alias, version, "test")


@pytest.fixture
def make_version(tiny_base: Path, mlflow_store: str, tmp_path: Path) -> Callable[..., VersionRef]:
    """Register a version on the tiny base in this test's store (see Publisher.publish)."""
    return Publisher(mlflow_store, tmp_path, tiny_base).publish


@pytest.fixture(scope="module")
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_base: Path
) -> Iterator[Publisher]:
    """One store shared by a test module (gateways are slow to start): publish versions, move aliases.
    SQLite by default; parametrize it indirectly with "postgres" for the PostgreSQL-backed MLflow server."""
    root = tmp_path_factory.mktemp("store")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    if getattr(request, "param", "sqlite") == "postgres":
        server: TrackingServer = request.getfixturevalue("tracking_server")
        server.reset()
        uri = server.uri
    else:
        uri = f"sqlite:///{root}/mlflow.db"
    try:
        _use_store(uri, mp)
        yield Publisher(uri, root, tiny_base)
    finally:
        mp.undo()
