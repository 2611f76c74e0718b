"""A team's shared tracking stack on one machine: PostgreSQL plus `mlflow server` serving the artifacts.

Everything lives in one folder (`.stack/` by default): the database cluster, the artifact store, logs, the
generated database password and the pids. Clients only talk HTTP to the server (`--serve-artifacts`), so any
command works with `MLFLOW_TRACKING_URI=http://HOST:PORT`. PostgreSQL refuses to run as root, so as root the
cluster is owned and run by the `postgres` system user. The server runs in its own session so that stopping it
stops its workers too; `up` twice is harmless and `down` keeps the data.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core.errors import TuneopsError

DEFAULT_FOLDER = Path(".stack")
DEFAULT_PORT = 5000
DEFAULT_PG_PORT = 5433
DB_USER = "tuneops"
PG_SYSTEM_USER = "postgres"
TRACKING_DB = "mlflow"
AUTH_DB = "mlflow_auth"
ADMIN_USER = "admin"
HEALTH_TIMEOUT_S = 90.0


class StackError(TuneopsError):
    """The stack cannot start or stop: PostgreSQL missing, a port taken, the server failing to answer."""


def find_pg_bin() -> Path | None:
    """The newest installed PostgreSQL's binary folder (Debian layout first, then PATH), or None."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for folder in reversed(versions):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb and shutil.which("pg_ctl") else None


def install_postgres() -> Path:
    """The PostgreSQL binaries, installed with apt when missing (only root can); StackError when impossible."""
    found = find_pg_bin()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError("PostgreSQL is not installed; install it (e.g. `apt-get install postgresql`) as root")
    for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        res = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            raise StackError(f"installing PostgreSQL failed ({' '.join(args)}): {res.stderr.strip()[-500:]}")
    found = find_pg_bin()
    if not found:
        raise StackError("apt installed postgresql but no initdb/pg_ctl was found under /usr/lib/postgresql")
    return found


@dataclass(frozen=True)
class Stack:
    """One stack folder: where its parts live and how to reach them."""

    folder: Path = DEFAULT_FOLDER
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    pg_port: int = DEFAULT_PG_PORT
    workers: int = 2

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pgdata(self) -> Path:
        return self.folder.resolve() / "postgres" / "data"

    @property
    def socket_dir(self) -> Path:
        return self.folder.resolve() / "postgres" / "socket"

    @property
    def artifacts(self) -> Path:
        return self.folder.resolve() / "artifacts"

    @property
    def server_pid_file(self) -> Path:
        return self.folder.resolve() / "mlflow-server.pid"

    @property
    def auth_config(self) -> Path:
        return self.folder.resolve() / "basic_auth.ini"

    def _secret(self, name: str) -> str:
        """A generated secret kept in the folder (mode 600), the same on every start."""
        path = self.folder.resolve() / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(24))
        return path.read_text().strip()

    def database_uri(self, database: str = TRACKING_DB) -> str:
        return f"postgresql+psycopg://{DB_USER}:{self._secret('db-password')}@127.0.0.1:{self.pg_port}/{database}"

    # ---- PostgreSQL ------------------------------------------------------------------------------------

    def _as_owner(self, args: list[str]) -> list[str]:
        """PostgreSQL tools run as the cluster's owner: the `postgres` user when we are root."""
        return ["runuser", "-u", PG_SYSTEM_USER, "--", *args] if os.geteuid() == 0 else args

    def _run(self, args: list[str], what: str, env: dict[str, str] | None = None) -> str:
        res = subprocess.run(args, capture_output=True, text=True, env=env, check=False, cwd="/")
        if res.returncode != 0:
            detail = (res.stderr or res.stdout).strip()[-800:]
            raise StackError(f"{what} failed: {detail}")
        return res.stdout

    def _pg_env(self) -> dict[str, str]:
        return os.environ | {"PGPASSWORD": self._secret("db-password")}

    def postgres_running(self, pg_bin: Path) -> bool:
        if not (self.pgdata / "PG_VERSION").is_file():
            return False
        res = subprocess.run(
            self._as_owner([str(pg_bin / "pg_ctl"), "status", "-D", str(self.pgdata)]),
            capture_output=True,
            check=False,
            cwd="/",
        )
        return res.returncode == 0

    def _init_cluster(self, pg_bin: Path) -> None:
        pg_root = self.pgdata.parent
        for folder in (self.pgdata, self.socket_dir):
            folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            for folder in (pg_root, self.pgdata, self.socket_dir):
                shutil.chown(folder, PG_SYSTEM_USER, PG_SYSTEM_USER)
            self.pgdata.chmod(0o700)
            probe = subprocess.run(self._as_owner(["test", "-w", str(self.pgdata)]), check=False, cwd="/")
            if probe.returncode != 0:
                raise StackError(
                    f"the '{PG_SYSTEM_USER}' user cannot reach {self.pgdata}: a folder above it is private; "
                    "put the stack folder where every user may enter (chmod o+x on its parents)"
                )
        if (self.pgdata / "PG_VERSION").is_file():
            return
        pwfile = pg_root / "initdb-password"
        pwfile.write_text(self._secret("db-password") + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, PG_SYSTEM_USER, PG_SYSTEM_USER)
        try:
            self._run(
                self._as_owner(
                    [
                        str(pg_bin / "initdb"),
                        "-D",
                        str(self.pgdata),
                        "-U",
                        DB_USER,
                        f"--pwfile={pwfile}",
                        "--auth-host=scram-sha-256",
                        "--auth-local=scram-sha-256",
                        "-E",
                        "UTF8",
                    ]
                ),
                "initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def start_postgres(self, pg_bin: Path) -> None:
        """Create the cluster on first use, start it on 127.0.0.1:pg_port, create the databases."""
        self._init_cluster(pg_bin)
        if not self.postgres_running(pg_bin):
            options = f"-c listen_addresses=127.0.0.1 -c port={self.pg_port} -c unix_socket_directories="
            log = self.pgdata.parent / "postgres.log"
            pg_ctl = [str(pg_bin / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.pgdata), "-l", str(log)]
            self._run(
                self._as_owner([*pg_ctl, "-o", options + str(self.socket_dir)]),
                f"starting PostgreSQL on port {self.pg_port} (log: {log})",
            )
        psql = [str(pg_bin / "psql"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", DB_USER, "-d", "postgres"]
        for database in (TRACKING_DB, AUTH_DB):
            exists = self._run(
                [*psql, "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{database}'"],
                "reading the databases",
                self._pg_env(),
            )
            if exists.strip() != "1":
                self._run([*psql, "-c", f'CREATE DATABASE "{database}"'], f"creating {database}", self._pg_env())

    def stop_postgres(self, pg_bin: Path) -> bool:
        if not self.postgres_running(pg_bin):
            return False
        self._run(
            self._as_owner([str(pg_bin / "pg_ctl"), "stop", "-w", "-t", "60", "-m", "fast", "-D", str(self.pgdata)]),
            "stopping PostgreSQL",
        )
        return True

    # ---- mlflow server ---------------------------------------------------------------------------------

    def server_pid(self) -> int | None:
        """The server's pid (its process group) when it is alive, else None."""
        try:
            pid = int(self.server_pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.tracking_uri + "/health", timeout=5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _write_auth_config(self, admin_password: str) -> None:
        self.auth_config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {self.database_uri(AUTH_DB)}\n"
            f"admin_username = {ADMIN_USER}\n"
            f"admin_password = {admin_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        self.auth_config.chmod(0o600)

    def start_server(self, auth: bool = False) -> None:
        """Start `mlflow server` in its own session (so `down` reaches its workers) and wait for /health."""
        if self.server_pid() is not None and self.healthy():
            return
        if self.healthy():
            raise StackError(f"port {self.port} already answers /health but is not this stack's server")
        self.artifacts.mkdir(parents=True, exist_ok=True)
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin) if mlflow_bin.is_file() else "mlflow", "server"]
        cmd += ["--backend-store-uri", self.database_uri(), "--artifacts-destination", str(self.artifacts)]
        cmd += ["--serve-artifacts", "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
        env = dict(os.environ)
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(var, None)
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # GenAI job workers: unused, a CPU each
        if auth:
            self._write_auth_config(self._secret("admin-password"))
            cmd += ["--app-name", "basic-auth"]
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.auth_config)
            env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", self._secret("flask-secret-key"))  # CSRF, all workers
        log = self.folder.resolve() / "mlflow-server.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        self.server_pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.server_pid_file.unlink(missing_ok=True)
                tail = log.read_text(errors="replace")[-1500:]
                raise StackError(f"mlflow server exited with status {proc.returncode}; log {log}:\n{tail}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop_server()
        raise StackError(
            f"mlflow server did not answer {self.tracking_uri}/health in {HEALTH_TIMEOUT_S:.0f}s; log {log}"
        )

    def stop_server(self, grace_s: float = 20.0) -> bool:
        """Stop the server's whole process group: the parent and every worker it forked."""
        pid = self.server_pid()
        self.server_pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(pid):
            _reap(pid)
            time.sleep(0.2)
        if _group_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        _reap(pid)
        return True

    # ---- the whole stack -------------------------------------------------------------------------------

    def up(self, auth: bool = False) -> None:
        """Start PostgreSQL, then the server on it (PostgreSQL installed first when missing); idempotent."""
        pg_bin = install_postgres()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.start_postgres(pg_bin)
        self.start_server(auth=auth)

    def down(self) -> list[str]:
        """Stop the server, then PostgreSQL; the data stays. Returns what was stopped."""
        stopped = ["mlflow server"] if self.stop_server() else []
        pg_bin = find_pg_bin()
        if pg_bin and self.stop_postgres(pg_bin):
            stopped.append("PostgreSQL")
        return stopped

    def status(self) -> dict[str, bool]:
        pg_bin = find_pg_bin()
        return {
            "postgres": bool(pg_bin and self.postgres_running(pg_bin)),
            "mlflow server": self.server_pid() is not None and self.healthy(),
        }


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    """Collect the server's exit status when this process started it (no zombie left in tests)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
