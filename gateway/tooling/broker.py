"""A Mosquitto child process on a loopback port, for the demo and the tests.

Production runs the system's Mosquitto with ``systemd/mosquitto-gatehouse.conf``; this starts the
same broker binary with a config of the same shape (persistence on, saved every 30 s and at
every stop, a message size limit) in a folder of its own.
"""

from __future__ import annotations

import getpass
import os
import random
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


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's ephemeral range.

    A server that is stopped and started again on the same port (a broker restarted mid-test) must not
    find its port taken meanwhile by some client's outgoing connection, which only ever gets an
    ephemeral port; a client retrying a connect to the dead port can even connect to itself there.
    """
    lo, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, lo))
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded machine: any free port at all
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MosquittoProcess:
    """Start with :meth:`start`, stop with :meth:`stop` (SIGTERM) or :meth:`kill` (SIGKILL).

    Persistence goes to ``folder``, so a broker killed and started again on the same folder keeps
    what it had saved, as a real deployment would.
    """

    def __init__(
        self,
        folder: Path,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        max_queued: int = 1000,
        extra_conf: str = "",
        password_file: Path | None = None,
        acl_file: Path | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """``password_file`` turns anonymous access off; ``acl_file`` (with it) is the ACL, as shipped in
        systemd/gatehouse.acl; ``tls`` is (CA, certificate, key) for the listener."""
        if acl_file is not None and password_file is None:
            raise ValueError("an ACL keys on user names: give a password_file with it")
        self.folder = Path(folder)
        self.host = host
        self.port = port or free_port(host)
        self.max_queued = max_queued
        self.extra_conf = extra_conf
        self.password_file = password_file
        self.acl_file = acl_file
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
autosave_interval 30
autosave_on_changes false
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
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        else:
            lines.append("allow_anonymous true")
        return "\n".join(lines)

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Start and wait until it listens. A port still held for a moment (a restart on the same port
        right after a kill) is tried again until ``timeout``."""
        self.write_conf()
        deadline = time.monotonic() + timeout
        while True:
            self._close()
            self.proc = subprocess.Popen(
                [find_mosquitto(), "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.2):
                        return self
                except OSError:
                    time.sleep(0.02)
            else:
                break
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            log = self.folder / "mosquitto.log"
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            if "Address already in use" in err + tail[-200:] and time.monotonic() < deadline:
                time.sleep(0.25)
                continue
            raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {err.strip()} {tail}")
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
