"""A throw-away PostgreSQL server for tests: initdb in a temp dir, 127.0.0.1 on an ephemeral port.

    with PgCluster() as pg:                 # PgUnavailable (-> pytest.skip) without the binaries
        url = pg.url("postgres")            # postgresql://facerec@127.0.0.1:<port>/postgres
        url = pg.schema_url("t1")           # the same database, search_path=t1 (schema created)

Binaries: initdb/pg_ctl on PATH, else the newest /usr/lib/postgresql/<v>/bin (Debian's `postgresql`
package; `scripts/postgres_ci.sh` installs it). As root, the server runs as the `postgres` user
(PostgreSQL refuses to run as root). FR_TEST_DATABASE_URL=postgresql://... uses an existing server
instead (its database must be disposable: tests create schemas in it).
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

USER = "facerec"
START_TIMEOUT_S = 60


class PgUnavailable(Exception):
    """No PostgreSQL to test against (the reason says why)."""


def find_bin_dir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return candidates[-1].parent if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    def __init__(self) -> None:
        self._external = os.environ.get("FR_TEST_DATABASE_URL", "").strip()
        self._dir: Path | None = None
        self._bin: Path | None = None
        self._as_user: list[str] = []
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "PgCluster":
        if self._external:
            return self
        self._bin = find_bin_dir()
        if self._bin is None:
            raise PgUnavailable("PostgreSQL binaries (initdb, pg_ctl) not found: install the Debian package "
                                "`postgresql` (scripts/postgres_ci.sh) or set FR_TEST_DATABASE_URL")
        self._dir = Path(tempfile.mkdtemp(prefix="facerec-pg-"))
        if os.geteuid() == 0:  # the server refuses to run as root
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                shutil.rmtree(self._dir, ignore_errors=True)
                raise PgUnavailable("running as root and there is no `postgres` user to run the server") from exc
            runuser = shutil.which("runuser") or next(
                (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(p)), None)
            if runuser is None:
                shutil.rmtree(self._dir, ignore_errors=True)
                raise PgUnavailable("running as root and `runuser` (util-linux) is missing to drop to `postgres`")
            os.chown(self._dir, pw.pw_uid, pw.pw_gid)
            self._as_user = [runuser, "-u", "postgres", "--"]
        try:
            self._run("initdb", "-D", str(self._dir / "data"), "-U", USER, "-A", "trust", "-E", "UTF8",
                      "--locale=C", "--no-sync")
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _run(self, tool: str, *args: str, timeout: float = START_TIMEOUT_S) -> str:
        assert self._bin is not None
        cmd = [*self._as_user, str(self._bin / tool), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self._dir)
        if proc.returncode != 0:
            raise PgUnavailable(f"{tool} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def _start(self) -> None:
        assert self._dir is not None
        last = ""
        for _ in range(5):  # the port may be taken between choosing and binding it
            self.port = _free_port()
            try:
                self._pg_ctl_start()
                return
            except PgUnavailable as exc:
                last = str(exc)
        log = (self._dir / "server.log").read_text(errors="replace")[-2000:] if (self._dir / "server.log").exists() else ""
        raise PgUnavailable(f"PostgreSQL did not start: {last}\n{log}")

    def _pg_ctl_start(self) -> None:
        assert self._dir is not None
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self._dir} "
                   "-c fsync=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self._dir / "data"), "-l", str(self._dir / "server.log"),
                  "-o", options, "-w", "-t", str(START_TIMEOUT_S), "start")

    # ------------------------------------------------------------------ faults (outage tests)
    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server (`pg_ctl stop -m fast`: clients' sessions are terminated) and wait for it."""
        if self._external:
            raise PgUnavailable("cannot stop an external server (FR_TEST_DATABASE_URL)")
        self._run("pg_ctl", "-D", str(self._dir / "data"), "-m", mode, "-w", "stop")

    def start_server(self) -> None:
        """Start it again after stop_server, on the same port (clients reconnect to the same URL)."""
        self._pg_ctl_start()

    def __exit__(self, *exc) -> None:
        if self._dir is None:
            return
        if (self._dir / "data" / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self._dir / "data"), "-m", "immediate", "-w", "stop")
            except (PgUnavailable, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    # ------------------------------------------------------------------ URLs
    def url(self, database: str = "postgres") -> str:
        if self._external:
            return self._external
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def schema_url(self, schema: str | None = None) -> str:
        """A URL whose connections use a fresh schema of their own (search_path): isolates tests
        in one database. The schema is created here."""
        import psycopg

        schema = schema or "t_" + uuid.uuid4().hex[:12]
        base = self.url()
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        sep = "&" if "?" in base else "?"
        return f"{base}{sep}options={quote(f'-csearch_path={schema}')}"


def wait_until(predicate, timeout: float, interval: float = 0.005) -> float | None:
    """Seconds until predicate() was true, or None on timeout."""
    start = time.perf_counter()
    while True:
        if predicate():
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            return None
        time.sleep(interval)
