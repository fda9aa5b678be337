"""A PostgreSQL server of the tests' own: Debian's initdb and pg_ctl into a temporary folder, on a free loopback
port, password authentication over TCP (the portal reads the password from a pgpass file, as in production).

Started once per test session (:func:`tests.conftest.postgres`); each test gets a database of its own
(:meth:`PostgresServer.new_database`). As root (CI, the lead's machine) the server runs as Debian's ``postgres``
user, since PostgreSQL refuses to run as root; its folder is made outside any private (0700) home folder.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from gateway.tooling.broker import free_port
from portal.store import Postgres

SUPERUSER = "gatehouse"


def find_bin() -> Path:
    """The newest PostgreSQL's programs (Debian installs them under /usr/lib/postgresql/<major>/bin)."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    for d in reversed(dirs):
        if os.access(Path(d) / "pg_ctl", os.X_OK) and os.access(Path(d) / "initdb", os.X_OK):
            return Path(d)
    raise RuntimeError(
        "PostgreSQL is not installed: run `make test` (it installs the postgresql package), or"
        " apt-get install postgresql"
    )


class PostgresServer:
    def __init__(self, *, durable: bool = False) -> None:
        """``durable``: fsync and synchronous commits on, as a production server runs (the benchmark's); the
        tests' throwaway databases go without."""
        self.durable = durable
        self.bin = find_bin()
        self.port = free_port()
        self.password = secrets.token_urlsafe(18)
        self.root = Path(tempfile.mkdtemp(prefix="gatehouse-pg-"))
        self.data = self.root / "data"
        self.passfile = self.root / "pgpass"
        self._as: list[str] = []
        self._n = 0
        if os.geteuid() == 0:  # initdb and postgres refuse root: Debian's postgres user runs them
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]

    def _run(self, *args: str, timeout: float = 120.0) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.root)}
        r = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")

    def start(self) -> PostgresServer:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            pw = pwd.getpwnam("postgres")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        pwfile.chmod(0o600)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        # fsync off: these databases are thrown away; everything else is a stock server.
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )
        self.passfile.write_text(f"127.0.0.1:{self.port}:*:{SUPERUSER}:{self.password}\n")
        self.passfile.chmod(0o600)
        return self

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={SUPERUSER}"

    def target(self, dbname: str) -> Postgres:
        return Postgres(self.dsn(dbname), self.passfile)

    def admin(self, sql: str) -> None:
        """Run one statement as the superuser, outside a transaction (CREATE/DROP DATABASE)."""
        import psycopg

        with psycopg.connect(self.dsn(), passfile=str(self.passfile), autocommit=True) as c:
            c.execute(sql)

    def new_database(self, prefix: str = "t") -> Postgres:
        """An empty database of its own (UTF-8, text in code-point order as the store asks)."""
        self._n += 1
        name = f"{prefix}_{os.getpid()}_{self._n}_{int(time.time() * 1000) % 100000}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'")
        return self.target(name)

    def drop_database(self, target: Postgres) -> None:
        name = dict(p.split("=", 1) for p in target.dsn.split())["dbname"]
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


_shared: PostgresServer | None = None


def shared_server() -> PostgresServer:
    """The session's server, started at the first call (tests/conftest.py stops it at the end of the session)."""
    global _shared
    if _shared is None:
        _shared = PostgresServer().start()
    return _shared


def stop_shared_server() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None


def test_store() -> str:
    """The engine the portal tests' configs put the store on: GATEHOUSE_TEST_STORE=postgresql runs any portal test
    file against PostgreSQL (a database per config); tests that open the SQLite file themselves are SQLite-only."""
    return os.environ.get("GATEHOUSE_TEST_STORE", "sqlite")


_by_folder: dict[Path, Postgres] = {}


def store_config_lines(folder: Path) -> list[str]:
    """The ``store:`` section of a test config on a new PostgreSQL database, or nothing for SQLite."""
    if test_store() != "postgresql":
        return []
    target = _by_folder.get(folder)
    if target is None:  # a config written again for the same folder (a restart) keeps its database
        target = _by_folder[folder] = shared_server().new_database("cfg")
    return ["store:", "  backend: postgresql", f"  dsn: '{target.dsn}'", f"  passfile: {target.passfile}"]
