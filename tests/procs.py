"""Child processes for end-to-end tests: the gateway, the portal and the stubs, each a real program.

Every program here prints one JSON line with ``"ready": true`` on stdout when it is serving; the
rest of its stdout is kept in :attr:`Child.lines`, its stderr goes to a log file beside the test.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PY = sys.executable


class Child:
    def __init__(self, name: str, args: list[str], logdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.logdir = logdir
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.info: dict[str, Any] = {}
        self._buf = b""

    @property
    def log_path(self) -> Path:
        return self.logdir / f"{self.name}.log"

    def start(self, *, wait_ready: bool = True, timeout: float = 30.0) -> Child:
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115  (the child keeps it; closed when we reap)
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=self.env,
            cwd=Path(__file__).resolve().parents[1],
        )
        log.close()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def _read_lines(self, timeout: float) -> list[str]:
        assert self.proc and self.proc.stdout
        fd = self.proc.stdout.fileno()
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return []
        chunk = os.read(fd, 65536)
        if not chunk:
            raise EOFError
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        out = [ln.decode(errors="replace") for ln in lines]
        self.lines.extend(out)
        return out

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                lines = self._read_lines(min(0.2, max(0.0, deadline - time.monotonic())))
            except EOFError:
                break
            for ln in lines:
                if ln.startswith("{") and '"ready"' in ln:
                    self.info = json.loads(ln)
                    return self.info
        self.kill()
        raise RuntimeError(f"{self.name} not ready within {timeout}s; log:\n{self.tail()}")

    def read_until(self, needle: str, timeout: float = 10.0) -> str:
        for ln in self.lines:
            if needle in ln:
                return ln
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ln in self._read_lines(0.2):
                if needle in ln:
                    return ln
        raise TimeoutError(f"{self.name}: {needle!r} not printed within {timeout}s")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._close()

    def _close(self) -> None:
        if self.proc and self.proc.stdout and not self.proc.stdout.closed:
            self.proc.stdout.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def read_rows(db: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """A read-only query of a child's SQLite store: ``[]`` while the file or its tables do not exist yet."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def wait(cond: Callable[[], bool], timeout: float, what: str, rig: Any = None) -> None:
    """Poll ``cond`` every 0.1 s; on timeout fail with ``what`` and, when given, the rig's logs (``rig.logs()``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{rig.logs() if rig else ''}")


def gateway(config: Path, logdir: Path, name: str = "gateway", env: dict[str, str] | None = None) -> Child:
    return Child(name, [PY, "-m", "gateway.cli", "gateway", "run", "--config", str(config)], logdir, env)


def portal(config: Path, logdir: Path, name: str = "portal") -> Child:
    return Child(name, [PY, "-m", "portal", "run", "--config", str(config)], logdir)
