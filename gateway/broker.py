"""A Mosquitto child process on a loopback port, for the demo and the tests.

Production runs the system's Mosquitto with ``systemd/mosquitto-gatehouse.conf``; this starts the
same broker binary with a config of the same shape (persistence on, saved on every change, a
message size limit) in a folder of its own.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from gateway.wire import MAX_PAYLOAD_BYTES


class BrokerError(RuntimeError):
    pass


def find_mosquitto() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise BrokerError("mosquitto is not installed: run `make demo` or `make test`, or apt-get install mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MosquittoProcess:
    """Start with :meth:`start`, stop with :meth:`stop` (SIGTERM) or :meth:`kill` (SIGKILL).

    Persistence goes to ``folder``, so a broker killed and started again on the same folder keeps
    what it had saved, as a real deployment would.
    """

    def __init__(self, folder: Path, port: int | None = None, *, host: str = "127.0.0.1",
                 max_queued: int = 1000, extra_conf: str = "", password_file: Path | None = None,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        """``password_file`` turns anonymous access off; ``tls`` is (CA, certificate, key) for the listener."""
        self.folder = Path(folder)
        self.host = host
        self.port = port or free_port(host)
        self.max_queued = max_queued
        self.extra_conf = extra_conf
        self.password_file = password_file
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.folder / "mosquitto.conf"

    def write_conf(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(
            f"""# written by gatehouse for a local broker
# Started as root, Mosquitto would switch to the 'mosquitto' user and lose access to this folder.
user {getpass.getuser()}
listener {self.port} {self.host}
{self._security()}
persistence true
persistence_location {self.folder}/
autosave_interval 1
autosave_on_changes true
max_queued_messages {self.max_queued}
message_size_limit {MAX_PAYLOAD_BYTES * 5}
log_dest file {self.folder}/mosquitto.log
log_type error
log_type warning
log_type notice
{self.extra_conf}
""",
            encoding="utf-8",
        )

    def _security(self) -> str:
        lines = []
        if self.tls is not None:
            ca, cert, key = self.tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines.append("allow_anonymous true")
        return "\n".join(lines)

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        self.write_conf()
        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = (self.folder / "mosquitto.log")
                tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {err.strip()} {tail}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
