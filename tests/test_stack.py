"""`tuneops stack`: PostgreSQL + MLflow server with basic auth, started twice, stopped with nothing left behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_serve_support import free_port

from tuneops.cli import run as cli

pytestmark = pytest.mark.integration


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in a process group, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def stack_folder() -> Iterator[Path]:
    from tuneops.stack import StackError, install_postgres

    try:
        install_postgres()
    except StackError as exc:
        pytest.skip(f"PostgreSQL cannot be installed here: {exc}")
    root = Path(tempfile.mkdtemp(prefix="tuneops-stack-test-"))
    root.chmod(0o755)  # the `postgres` user enters it when we are root
    yield root / ".stack"
    shutil.rmtree(root, ignore_errors=True)


def test_stack_up_twice_serves_with_basic_auth_and_down_leaves_no_process_but_keeps_data(
    stack_folder, monkeypatch, capsys
):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tuneops.stack import ADMIN_USER, Stack

    port, pg_port = free_port(), free_port()
    args = ["--folder", str(stack_folder), "--port", str(port), "--pg-port", str(pg_port), "--workers", "1"]
    stack = Stack(stack_folder, port=port, pg_port=pg_port, workers=1)
    try:
        assert cli(["stack", "up", "--auth", *args]) == 0
        out = capsys.readouterr().out
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in out
        server = stack.server_pid()
        assert server is not None and len(_group_members(server)) >= 2  # the server and its worker
        assert cli(["stack", "up", "--auth", *args]) == 0  # harmless: the same server keeps running
        assert stack.server_pid() == server
        postmaster = int((stack.pgdata / "postmaster.pid").read_text().split()[0])

        uri = stack.tracking_uri
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN_USER)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", (stack_folder / "admin-password").read_text().strip())
        MlflowClient(uri, uri).create_registered_model("kept")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(MlflowException, match="401"):
            MlflowClient(uri, uri).get_registered_model("kept")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        capsys.readouterr()
        assert cli(["history", "kept"]) == 2  # one clear line, not "no registered model named 'kept'"
        assert f"tracking server {uri} refused user '{ADMIN_USER}'" in capsys.readouterr().err

        capsys.readouterr()
        assert cli(["stack", "down", *args]) == 0
        assert "stopped mlflow server and PostgreSQL" in capsys.readouterr().out
        assert _group_members(server) == [] and not _alive(postmaster)
        assert cli(["stack", "status", *args]) == 0
        assert capsys.readouterr().out.splitlines() == ["postgres: stopped", "mlflow server: stopped"]

        assert cli(["stack", "up", *args]) == 0  # without auth this time; the data survived
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        assert MlflowClient(uri, uri).get_registered_model("kept").name == "kept"
    finally:
        stack.down()
    assert not any(_alive(int(p.name)) and str(stack_folder) in _cmdline(p) for p in Path("/proc").glob("[0-9]*"))


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_postgres_missing_and_not_installable_is_a_clear_error(monkeypatch):
    from tuneops import stack

    monkeypatch.setattr(stack, "find_pg_bin", lambda: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(stack.StackError, match="PostgreSQL is not installed"):
        stack.install_postgres()


@pytest.mark.parametrize("mlflow_store", ["postgres"], indirect=True)
def test_two_jobs_at_once_against_one_server_get_their_own_run_and_version(make_version, mlflow_store, tmp_path):
    """Two jobs logging and registering at the same moment never share a run or a version number.

    The bundle is built once beforehand: loading models in two threads of one process is not what two
    `tuneops train` processes do (and transformers' loading is not thread-safe); the registry part is.
    """
    import threading

    import mlflow

    from core.pyfunc import publish_version
    from core.registry import connect

    first = make_version("shared-model", seed=1)
    bundle = tmp_path / "bundle-shared-model-1-None"  # where Publisher wrote the version it registered
    assert (bundle / "manifest.json").is_file()
    start, versions, errors = threading.Barrier(2), [], []

    def job() -> None:
        start.wait()
        try:
            with mlflow.start_run() as run:
                mv = publish_version(bundle, "shared-model", pip_requirements=["torch"])
            versions.append((str(mv.version), run.info.run_id))
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    assert sorted(v for v, _ in versions) == ["2", "3"] and len({r for _, r in versions} | {first.run_id}) == 3
    client = connect(mlflow_store)
    assert {(v, client.get_model_version("shared-model", v).run_id) for v, _ in versions} == set(versions)
