"""Network impairment between the gateway and the broker, inside a private network namespace.

This kernel has no ``sch_netem``, so delay and loss are made from what it has:

* loss, a blackhole, a refusal: nftables rules inside the namespace on the port the gateway dials,
  so the kernel really drops (or resets) those packets and TCP retransmits as it would on a bad link;
* delay: :func:`run_relay`, a TCP relay inside the namespace between the gateway and the broker that
  holds every chunk for D ms in each direction (a FIFO per direction, so order is kept), changeable
  while it runs through a control port;
* connection attempts: every SYN to that port puts its source port into an nftables set with a
  timeout, and the time left on each element tells when it was added, to the millisecond.

Everything in the namespace listens on its own loopback, so fixed port numbers are safe. The
namespace belongs to a user namespace of our own (``unshare --user --map-root-user --net``), so a normal
user runs these tests as root does: root inside is the caller, with network rights there only. The test
process reaches into it through :meth:`Netns.socket`, a socket made inside by the namespace's first
process and handed over (SCM_RIGHTS).

Run ``python -m tests.netns_support relay --target-port P [--delay-ms D]`` for the relay alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from gateway.tooling.broker import BrokerError, MosquittoProcess, find_mosquitto
from tests import procs

ATTEMPTS_TIMEOUT_S = 3600  # nftables set element lifetime; the time left dates each element


def _tool(name: str) -> str | None:
    """A program on PATH, or in the system folders a normal user's PATH leaves out on Debian (nft is /usr/sbin/nft)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


NFT = _tool("nft") or "nft"


def missing_requirements() -> list[str]:
    """What this machine lacks for the impairment tests (empty when all is there)."""
    problems = []
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` (util-linux) is not installed")
    if shutil.which("ip") is None:
        problems.append("`ip` (iproute2) is not installed")
    if _tool("nft") is None:
        problems.append("`nft` is not installed: run `make test` (it installs nftables)")
    return problems


def _run(args: list[str], *, input: str | None = None, timeout: float = 10.0) -> str:
    res = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


# The namespace's first process, run by `unshare` as root of a new user namespace with a network namespace of its
# own: it brings loopback up, then makes sockets in its namespace for the test process (which cannot enter it: joining
# a network namespace needs CAP_SYS_ADMIN in one's own user namespace too) and hands them over (SCM_RIGHTS) until the
# test closes its end.
_HOLDER = """
import os, socket, subprocess, sys
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
chan = socket.socket(fileno=int(sys.argv[1]))
chan.send(b"up")
while (req := chan.recv(64)):
    family, type_ = map(int, req.split())
    s = socket.socket(family, type_)
    socket.send_fds(chan, [b"s"], [s.fileno()])
    s.close()
"""


class Netns:
    """A network namespace of our own, loopback up, owned by a user namespace of our own, so a normal user can make
    one (``unshare --user --map-root-user --net``; root in it is the caller, with the network rights inside only);
    :meth:`close` kills what still runs in it and lets it go. Use as a context manager."""

    def __init__(self, prefix: str = "gh") -> None:
        self.name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._holder: subprocess.Popen[bytes] | None = None
        self._chan: socket.socket | None = None
        self._lock = threading.Lock()

    def create(self) -> Netns:
        mine, theirs = socket.socketpair()
        try:
            self._holder = subprocess.Popen(
                [
                    "unshare",
                    "--user",
                    "--map-root-user",
                    "--net",
                    "--",
                    sys.executable,
                    "-c",
                    _HOLDER,
                    str(theirs.fileno()),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._chan = mine
        mine.settimeout(10.0)
        if mine.recv(2) != b"up":
            self.close()
            raise RuntimeError(f"the network namespace {self.name} did not start (unshare --user --net)")
        return self

    @property
    def pid(self) -> int:
        assert self._holder is not None, "create() the namespace first"
        return self._holder.pid

    def exec_args(self, args: list[str]) -> list[str]:
        """``args`` run inside the namespace, as its root (``nsenter`` execs, so the pid is the program's)."""
        return ["nsenter", "-t", str(self.pid), "--user", "--net", "--preserve-credentials", "--", *args]

    def run(self, args: list[str], *, input: str | None = None) -> str:
        return _run(self.exec_args(args), input=input)

    def child(self, name: str, args: list[str], logdir: Path) -> procs.Child:
        return procs.Child(name, self.exec_args(args), logdir)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket that lives in this namespace (made there by its first process), to use as any other."""
        assert self._chan is not None, "create() the namespace first"
        with self._lock:
            self._chan.send(f"{int(family)} {int(type)}".encode())
            _, fds, _, _ = socket.recv_fds(self._chan, 1, 1)
        if not fds:
            raise RuntimeError(f"the namespace {self.name} made no socket (its first process ended?)")
        return socket.socket(fileno=fds[0])

    def connect(self, port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> socket.socket:
        s = self.socket()
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except BaseException:
            s.close()
            raise
        return s

    def pids(self) -> list[int]:
        """The processes in the namespace besides its first one (read from /proc: only our own can be there)."""
        if self._holder is None:
            return []
        try:
            ns = os.readlink(f"/proc/{self.pid}/ns/net")
        except OSError:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.pid:
                try:
                    if os.readlink(f"/proc/{entry}/ns/net") == ns:
                        found.append(int(entry))
                except OSError:
                    pass
        return found

    def close(self) -> None:
        """Kill whatever is left in the namespace, then its first process (and with it the namespace)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        if self._holder is not None:
            try:
                self._holder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._holder.kill()
                self._holder.wait()
            self._holder = None

    def __enter__(self) -> Netns:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()


_DURATION = re.compile(r"(\d+)(ms|h|m|s|d)")
_UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float:
    """nft's ``59m58s816ms`` in seconds."""
    return sum(int(n) * _UNIT_S[u] for n, u in _DURATION.findall(text))


class Impairment:
    """nftables rules on one TCP port inside a namespace: the path between the gateway and what it dials.

    Each change replaces the rules at once; the record of connection attempts (SYNs to the port, one per
    source port) is kept across changes.
    """

    TABLE = "gh_impair"

    def __init__(self, ns: Netns, port: int) -> None:
        self.ns = ns
        self.port = port
        self.mode = "clear"
        self._apply([])

    def _apply(self, rules: list[str]) -> None:
        p = self.port
        body = "\n    ".join(rules)
        script = f"""
table inet {self.TABLE} {{
  set attempts {{ type inet_service; flags dynamic, timeout; timeout {ATTEMPTS_TIMEOUT_S}s; }}
  chain input {{ type filter hook input priority 0; policy accept; }}
}}
flush chain inet {self.TABLE} input
table inet {self.TABLE} {{
  chain input {{
    tcp dport {p} tcp flags & (syn | ack | rst | fin) == syn add @attempts {{ tcp sport }}
    {body}
  }}
}}
"""
        self.ns.run([NFT, "-f", "-"], input=script)

    def clear(self) -> None:
        self.mode = "clear"
        self._apply([])

    def loss(self, percent: int) -> None:
        """Drop ``percent`` % of the packets each way, independently."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be 0..100 %, not {percent}")
        self.mode = f"loss {percent}%"
        if percent == 0:
            self._apply([])
            return
        p = self.port
        self._apply(
            [
                f"tcp dport {p} numgen random mod 100 < {percent} counter drop",
                f"tcp sport {p} numgen random mod 100 < {percent} counter drop",
            ]
        )

    def blackhole(self) -> None:
        """Drop everything both ways: the link is gone without a word."""
        self.mode = "blackhole"
        self._apply([f"tcp dport {self.port} counter drop", f"tcp sport {self.port} counter drop"])

    def refuse(self) -> None:
        """Answer every packet to the port with a TCP reset: the connection dies and every reconnect is
        refused at once, so the time between attempts is the client's own backoff and nothing else."""
        self.mode = "refuse"
        self._apply([f"tcp dport {self.port} counter reject with tcp reset"])

    def dropped(self) -> int:
        """Packets the current rules dropped or reset."""
        out = self.ns.run([NFT, "-j", "list", "chain", "inet", self.TABLE, "input"])
        total = 0
        for item in json.loads(out)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    total += int(expr["counter"]["packets"])
        return total

    def attempts(self) -> list[float]:
        """Monotonic times (this process's clock) of the connection attempts so far, oldest first."""
        out = self.ns.run([NFT, "list", "set", "inet", self.TABLE, "attempts"])
        now = time.monotonic()
        times = [now - (ATTEMPTS_TIMEOUT_S - parse_duration(m)) for m in re.findall(r"expires (\w+)", out)]
        return sorted(times)


class NetnsMosquitto(MosquittoProcess):
    """:class:`MosquittoProcess` started inside a namespace, with one more listener for the gateway.

    The portal dials :attr:`port`, the gateway :attr:`gateway_port`, so an impairment on the gateway's
    port leaves the portal's path clean.
    """

    def __init__(
        self, ns: Netns, folder: Path, *, port: int = 1883, gateway_port: int = 1884, max_queued: int = 100_000
    ) -> None:
        super().__init__(folder, port, max_queued=max_queued, extra_conf=f"listener {gateway_port} 127.0.0.1\n")
        self.ns = ns
        self.gateway_port = gateway_port

    def start(self, timeout: float = 10.0) -> NetnsMosquitto:
        self.write_conf()
        # Root of the namespace is the caller: Mosquitto, started as that root, may switch only to it.
        conf = self.conf_path.read_text()
        self.conf_path.write_text(re.sub(r"(?m)^user .*$", "user root", conf, count=1))
        self._close()
        self.proc = subprocess.Popen(
            self.ns.exec_args([find_mosquitto(), "-c", str(self.conf_path)]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                for port in (self.port, self.gateway_port):
                    self.ns.connect(port, timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        err = ""
        if self.proc.poll() is not None and self.proc.stderr:
            err = self.proc.stderr.read().decode(errors="replace")
        log = self.folder / "mosquitto.log"
        tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
        self.kill()
        raise BrokerError(
            f"mosquitto in {self.ns.name} did not listen on {self.port} and {self.gateway_port} "
            f"within {timeout}s: {err.strip()} {tail}"
        )

    def log_text(self) -> str:
        log = self.folder / "mosquitto.log"
        return log.read_text(errors="replace") if log.exists() else ""


# ---------------------------------------------------------------- the delay relay


class Relay:
    """Client side of a running relay: start it with :func:`start_relay`."""

    def __init__(self, ns: Netns, child: procs.Child) -> None:
        self.ns = ns
        self.child = child
        self.port = int(child.info["port"])
        self.control_port = int(child.info["control"])

    def set_delay(self, ms: float) -> None:
        with self.ns.connect(self.control_port) as s:
            s.sendall(f"delay {ms}\n".encode())
            reply = s.makefile("r").readline().strip()
        if reply != "ok":
            raise RuntimeError(f"relay refused delay {ms}: {reply!r}")

    def stop(self) -> None:
        self.child.stop()


def start_relay(ns: Netns, target_port: int, logdir: Path, *, delay_ms: float = 0, name: str = "relay") -> Relay:
    child = ns.child(
        name,
        [
            procs.PY,
            "-m",
            "tests.netns_support",
            "relay",
            "--target-port",
            str(target_port),
            "--delay-ms",
            str(delay_ms),
        ],
        logdir,
    )
    return Relay(ns, child.start(timeout=20))


class _Delay:
    def __init__(self, ms: float) -> None:
        self.s = ms / 1000


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: _Delay) -> None:
    """Copy one direction, each chunk held ``delay`` after it arrived; the queue keeps the order, and
    its bound stops reading (so TCP pushes back) when too much is held."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=1024)

    async def take_in() -> None:
        while True:
            data = await reader.read(65536)
            await queue.put((loop.time() + delay.s, data))
            if not data:
                return

    async def give_out() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(take_in())
        tg.create_task(give_out())


async def run_relay(target_port: int, delay_ms: float, *, host: str = "127.0.0.1") -> None:
    delay = _Delay(delay_ms)
    open_writers: set[asyncio.StreamWriter] = set()

    async def connection(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(host, target_port)
        except OSError:
            c_writer.transport.abort()
            return
        open_writers.update((c_writer, s_writer))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pump(c_reader, s_writer, delay))
                tg.create_task(_pump(s_reader, c_writer, delay))
        except* OSError:
            for w in (c_writer, s_writer):  # one side went away: the other goes too
                w.transport.abort()
        else:
            for w in (c_writer, s_writer):  # both sides said goodbye; let the last bytes out
                w.close()
        finally:
            open_writers.difference_update((c_writer, s_writer))

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            words = (await reader.readline()).decode(errors="replace").split()
            if len(words) == 2 and words[0] == "delay":
                try:
                    ms = float(words[1])
                except ValueError:
                    ms = -1.0
                if 0 <= ms <= 60_000:
                    delay.s = ms / 1000
                    writer.write(b"ok\n")
                else:
                    writer.write(b"error: delay is 0..60000 ms\n")
            else:
                writer.write(b"error: expected 'delay <ms>'\n")
            await writer.drain()
        finally:
            writer.close()

    relay = await asyncio.start_server(connection, host, 0)
    ctl = await asyncio.start_server(control, host, 0)
    port = relay.sockets[0].getsockname()[1]
    print(
        json.dumps(
            {
                "ready": True,
                "port": port,
                "control": ctl.sockets[0].getsockname()[1],
                "target": target_port,
                "delay_ms": delay_ms,
            }
        ),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with relay, ctl:
        await stop.wait()
        for w in list(open_writers):
            w.transport.abort()  # the pumps see the error and their connections end
        for _ in range(10):
            if not open_writers:
                break
            await asyncio.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description="A TCP relay that delays each direction by a fixed time.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay")
    r.add_argument("--target-port", type=int, required=True)
    r.add_argument("--delay-ms", type=float, default=0.0)
    args = ap.parse_args()
    if not 0 <= args.delay_ms <= 60_000:
        ap.error("--delay-ms must be 0..60000")
    asyncio.run(run_relay(args.target_port, args.delay_ms))


if __name__ == "__main__":
    main()
