"""A hung event loop stops feeding systemd's watchdog; the kill and the restart that follow lose no event.

systemd is not PID 1 here, so the test plays its side of the notify protocol for the real gateway process
(``gatehouse gateway run``, with its own Mosquitto): a real AF_UNIX datagram socket with ``SO_PASSCRED`` (systemd
checks each sender's pid with ``NotifyAccess=main``), and ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``
in the child's environment. systemd sets ``WATCHDOG_PID`` in the forked child before exec, to that child's own pid;
here a ``sh`` does the same (``export WATCHDOG_PID=$$; exec …``), so the gateway keeps the pid it was given.

The service's stdout and stderr are a pipe the test reads, as journald reads a service's stream. The hang is a real
one and needs nothing in the product: the journal stops reading (a journald that hangs, a known failure in the
field), its buffer fills (the test tops it up at once rather than wait for 64 KiB of log lines), and the gateway's
next log line blocks the event loop's thread in write(2) while the process lives on: ``/proc`` shows it asleep in
``pipe_write`` (``anon_pipe_write`` on newer kernels), not stopped. That log line comes on its own: the portal (the
test's MQTT client, acknowledging what it stores) falls silent after seq ``ACK_UNTIL``, so the uplink logs each
re-send. Then the test does what systemd does on a watchdog timeout with ``Restart=on-failure``: SIGABRT (SIGKILL
after a grace period) and, after ``RestartSec``, the same command again with a fresh journal stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from tests import procs
from tests.waiting import wait_for

pytestmark = [pytest.mark.timeout(90), pytest.mark.realtime]

SITE, GW = "s1", "gw1"
WATCHDOG_S = 1.5  # WATCHDOG_USEC; the unit says WatchdogSec=30s
ABORT_GRACE_S = 5.0  # TimeoutAbortSec (TimeoutStopSec in the unit): SIGABRT, then SIGKILL past this
RESTART_S = 0.5  # RestartSec (2 s in the unit)
COUNT, RATE = 300, 200.0  # the gateway's synthetic event source: COUNT events at RATE/s, resumed after a crash
ACK_UNTIL = 100  # the portal stores and acknowledges seqs up to here, then falls silent until the restart
WINDOW = 50  # events in flight unacknowledged: past it the rest wait in the outbox, never yet published
RESEND_AFTER_S, RESEND_MAX_S = 0.5, 1.0  # the uplink re-sends (and logs it) at least this often while unanswered
REPO = Path(__file__).resolve().parents[1]


def write_config(folder: Path, broker_port: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gateway.yaml"
    path.write_text(
        f"""
site: {SITE}
gateway: {GW}
data_dir: data
mqtt: {{host: 127.0.0.1, port: {broker_port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}
uplink: {{window: {WINDOW}, resend_after_s: {RESEND_AFTER_S}, resend_max_s: {RESEND_MAX_S}}}
loadgen: {{count: {COUNT}, rate: {RATE}}}
local_api: {{enabled: false}}
""",
        encoding="utf-8",
    )
    return path


# ---------------------------------------------------------------- systemd's side


@dataclass
class Note:
    mono: float  # when it arrived, on this process's monotonic clock
    pid: int  # the sender, from SCM_CREDENTIALS
    fields: dict[str, str]


class NotifySocket:
    """The socket systemd listens on for sd_notify datagrams, with the sender's credentials on each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notes: list[Note] = []
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._drain)

    def _drain(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            fields = dict(ln.split("=", 1) for ln in data.decode(errors="replace").split("\n") if "=" in ln)
            self.notes.append(Note(time.monotonic(), pid, fields))

    def of(self, pid: int, key: str, value: str = "1") -> list[float]:
        """When ``key=value`` arrived from ``pid`` (systemd, with NotifyAccess=main, hears only the main pid)."""
        return [n.mono for n in self.notes if n.pid == pid and n.fields.get(key) == value]

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


class Journal:
    """The reading end of a service's stdout and stderr, drained into a file as journald would, until
    :meth:`stall`: the reader stops and the buffer fills, as when journald hangs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self._out = open(path, "ab")  # noqa: SIM115  (closed in close())
        self._reading = True
        asyncio.get_running_loop().add_reader(self.r, self._drain)

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.r, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self._stop_reading()
                return
            self._out.write(chunk.replace(b"\0", b""))  # the filler stall() wrote is not the service's
            self._out.flush()

    def _stop_reading(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.r)
            self._reading = False

    def stall(self) -> int:
        """Stop reading and fill the buffer to its last byte; the bytes written. The filler goes through an
        open file description of its own, non-blocking, so the service's stays blocking as journald's is."""
        self._stop_reading()
        self._drain()
        fd = os.open(f"/proc/self/fd/{self.w}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        written = 0
        try:
            for size in (65536, 4096, 512, 64, 1):
                while True:
                    try:
                        written += os.write(fd, b"\0" * size)
                    except BlockingIOError:
                        break
        finally:
            os.close(fd)
        return written

    def text(self) -> str:
        self._out.flush()
        return self.path.read_text(errors="replace")

    def close(self) -> None:
        self._stop_reading()
        os.close(self.w)
        self._drain()  # what is left, the service being gone
        os.close(self.r)
        self._out.close()


class Service:
    """One run of ``gatehouse gateway run`` started as systemd starts the unit (Type=notify, WatchdogSec)."""

    def __init__(self, name: str, config: Path, logdir: Path, notify: NotifySocket) -> None:
        self.name = name
        self.config = config
        self.notify = notify
        logdir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(logdir / f"{name}.log")
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "PYTHONFAULTHANDLER")
        }
        env.update(
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",  # as the unit's Environment= line
            NOTIFY_SOCKET=str(notify.path),
            WATCHDOG_USEC=str(int(WATCHDOG_S * 1e6)),
        )
        # systemd sets WATCHDOG_PID in the forked child, to its own pid, before exec; so does this sh.
        # ulimit: no core file in the repo when SIGABRT ends it (the journal's coredump handling is systemd's).
        args = [
            "sh",
            "-c",
            'ulimit -c 0; export WATCHDOG_PID=$$; exec "$@"',
            "sh",
            procs.PY,
            "-m",
            "gateway.cli",
            "gateway",
            "run",
            "--config",
            str(config),
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self.journal.w, stderr=self.journal.w, env=env, cwd=REPO
        )
        self.pid = self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def pings(self, since: float = 0.0) -> list[float]:
        return [t for t in self.notify.of(self.pid, "WATCHDOG") if t >= since]

    def journal_tail(self) -> str:
        return f"--- {self.name}\n{self.journal.text()[-3000:]}"

    def last_fed(self) -> float:
        """Where systemd's watchdog timer was last reset: READY=1, or the last WATCHDOG=1 since."""
        return max([*self.notify.of(self.pid, "READY"), *self.pings()])

    async def ready(self, timeout: float = 30.0) -> float:
        got = await wait_for(
            lambda: self.notify.of(self.pid, "READY") or not self.alive,
            timeout,
            f"{self.name} READY=1",
            step=0.02,
            context=self.journal_tail,
        )
        assert self.alive, f"{self.name} exited before READY=1:\n{self.journal.text()[-3000:]}"
        return float(got[0])

    def loop_blocked_on_journal(self) -> bool:
        """The main thread (the event loop's) asleep in write(2) to a full pipe on stdout or stderr."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            wchan = Path(f"/proc/{self.pid}/wchan").read_text().strip()
            syscall = Path(f"/proc/{self.pid}/syscall").read_text().split()
        except OSError:
            return False
        state = stat.rsplit(")", 1)[1].split()[0]
        return state == "S" and wchan.endswith("pipe_write") and len(syscall) > 1 and int(syscall[1], 16) in (1, 2)

    def process_state(self) -> str:
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return "gone"

    async def watchdog_abort(self) -> tuple[int, float]:
        """systemd's answer to a watchdog timeout: WatchdogSignal (SIGABRT), SIGKILL after the grace period.
        The exit status and how long it took to exit."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGABRT)
        try:
            rc = await asyncio.to_thread(self.proc.wait, ABORT_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = await asyncio.to_thread(self.proc.wait)
        return rc, time.monotonic() - t0

    async def stop(self, timeout: float = 15.0) -> int:
        """systemctl stop: SIGTERM, SIGKILL past TimeoutStopSec."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return await asyncio.to_thread(self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return await asyncio.to_thread(self.proc.wait)

    def close(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait()
        self.journal.close()


# ---------------------------------------------------------------- the portal's side, and the gateway's store


@dataclass
class Portal:
    """The portal's half of the wire as a plain MQTT client: every copy of every event that reaches the broker,
    and an ack (the portal has stored it) for each seq up to ``ack_until``."""

    port: int
    ack_until: int = ACK_UNTIL
    copies: list[tuple[float, wire.Event, bytes]] = field(default_factory=list)  # (mono, event, its JSON)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="test-portal") as c:
            await c.subscribe(wire.topic(SITE, GW, "events"), qos=1)
            self.subscribed.set()
            async for msg in c.messages:
                assert isinstance(msg.payload, bytes)
                batch = wire.decode_batch(msg.payload, site=SITE, gateway=GW)
                now = time.monotonic()
                self.copies += [(now, ev, wire.encode(wire.batch_events(SITE, GW, [ev]))) for ev in batch.events]
                stored = [ev.seq for ev in batch.events if ev.seq <= self.ack_until]
                if stored:
                    await c.publish(wire.topic(SITE, GW, "ack"), wire.encode(wire.Ack(v=1, seqs=stored)), qos=1)

    def first_seen(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for t, ev, _ in self.copies:
            out.setdefault(ev.seq, t)
        return out


@contextlib.asynccontextmanager
async def running(portal: Portal) -> AsyncIterator[Portal]:
    task = asyncio.create_task(portal.run(), name="test-portal")
    try:
        await wait_for(lambda: portal.subscribed.is_set() or task.done(), 10, "the portal's subscription", step=0.02)
        if task.done():
            task.result()
        yield portal
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# ---------------------------------------------------------------- the test


async def test_a_hung_loop_starves_the_watchdog_and_the_restart_loses_nothing(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    cfg = write_config(tmp_path / "gw", broker.port)
    db = tmp_path / "gw" / "data" / "gateway.db"
    logs = tmp_path / "logs"
    figures: dict[str, Any] = {}
    async with running(Portal(broker.port)) as portal:
        notify = NotifySocket(tmp_path / "notify.sock")
        try:
            # -- a healthy gateway: READY=1, then WATCHDOG=1 regularly, from its main pid only
            first = Service("gateway-1", cfg, logs, notify)
            try:
                ready_at = await first.ready()
                figures["ready_s"] = round(ready_at - first.started, 2)
                await wait_for(
                    lambda: len(procs.read_rows(db, "SELECT seq FROM events")) == COUNT,
                    15,
                    f"all {COUNT} synthetic events stored",
                    step=0.02,
                    context=first.journal_tail,
                )
                await wait_for(
                    lambda: "re-sending" in first.journal.text(),
                    10,
                    "the uplink's re-send log line, the portal being silent",
                    step=0.02,
                    context=first.journal_tail,
                )
                await wait_for(
                    lambda: len(first.pings(ready_at)) >= 4,
                    10,
                    "four WATCHDOG=1 after READY=1",
                    step=0.02,
                    context=first.journal_tail,
                )
                fed = [ready_at, *first.pings(ready_at)]
                assert max(gaps(fed)) < WATCHDOG_S * 0.75, f"a healthy loop fed the watchdog late: {gaps(fed)}"
                assert min(gaps(fed)) > WATCHDOG_S * 0.25, f"fed far more often than half the period: {gaps(fed)}"
                figures["healthy_feed_interval_s"] = [round(g, 3) for g in gaps(fed)]

                # -- the journal hangs; the gateway's next log line blocks its loop, the process lives on
                stalled_at = time.monotonic()
                figures["journal_filler_bytes"] = first.journal.stall()
                await wait_for(
                    first.loop_blocked_on_journal,
                    RESEND_MAX_S + 3,
                    "the event loop blocked in write(2) to the full journal",
                    step=0.02,
                    context=first.journal_tail,
                )
                hung_at = time.monotonic()
                figures["stall_to_hang_s"] = round(hung_at - stalled_at, 2)
                # systemd's timer: WATCHDOG_USEC after the last WATCHDOG=1 it heard.
                await wait_for(
                    lambda: time.monotonic() - first.last_fed() > WATCHDOG_S,
                    WATCHDOG_S + 1,
                    "the watchdog to time out",
                    step=0.02,
                )
                timeout_at = time.monotonic()
                assert timeout_at - hung_at < WATCHDOG_S + 0.3, "the watchdog timed out late after the hang"
                late = first.pings(hung_at + 0.1)
                assert not late, f"a hung loop fed the watchdog: {[round(t - hung_at, 3) for t in late]}"
                assert first.alive and first.process_state() == "S" and first.loop_blocked_on_journal(), (
                    "at the timeout the gateway must be alive, asleep (not stopped) and still blocked"
                )
                figures["last_feed_to_timeout_s"] = round(timeout_at - first.last_fed(), 2)

                # -- systemd: WatchdogSignal=SIGABRT, SIGKILL after TimeoutAbortSec
                rc, took = await first.watchdog_abort()
                assert rc == -signal.SIGABRT, f"the gateway did not die of SIGABRT but {rc}"
                figures["abort_to_exit_s"] = round(took, 3)
                foreign = [n for n in notify.notes if n.pid != first.pid]
                assert not foreign, f"notifications from a pid other than the main one: {foreign}"
            finally:
                first.close()

            outbox = {s for (s,) in procs.read_rows(db, "SELECT seq FROM outbox")}
            assert outbox == set(range(ACK_UNTIL + 1, COUNT + 1)), "the outbox at the kill: all the unacknowledged"
            before = portal.first_seen()
            never_sent = outbox - set(before)
            assert len(never_sent) >= COUNT - ACK_UNTIL - WINDOW, "events held back by the window reached nobody"
            figures["at_kill"] = {"outbox": len(outbox), "never_published": len(never_sent)}

            # -- Restart=on-failure, after RestartSec: the same command; the portal answers again
            await asyncio.sleep(RESTART_S)
            portal.ack_until = COUNT
            second = Service("gateway-2", cfg, logs, notify)
            try:
                ready_at = await second.ready()
                figures["restart_ready_s"] = round(ready_at - second.started, 2)
                await wait_for(
                    lambda: set(portal.first_seen()) >= set(range(1, COUNT + 1)),
                    20,
                    f"all {COUNT} events at the broker",
                    step=0.02,
                    context=second.journal_tail,
                )
                await wait_for(
                    lambda: not procs.read_rows(db, "SELECT seq FROM outbox LIMIT 1"),
                    10,
                    "the outbox drained by the portal's acks",
                    step=0.02,
                    context=second.journal_tail,
                )
                await wait_for(
                    lambda: len(second.pings(ready_at)) >= 3,
                    10,
                    "WATCHDOG=1 from the new process",
                    step=0.02,
                    context=second.journal_tail,
                )
                fed = [ready_at, *second.pings(ready_at)]
                assert max(gaps(fed)) < WATCHDOG_S * 0.75, f"the new process fed the watchdog late: {gaps(fed)}"
                figures["restart_feed_interval_s"] = [round(g, 3) for g in gaps(fed)]
                figures["restart_to_all_delivered_s"] = round(max(portal.first_seen().values()) - second.started, 2)
                # systemctl stop: a clean exit with STOPPING=1.
                assert await second.stop() == 0, second.journal.text()[-3000:]
                assert second.notify.of(second.pid, "STOPPING"), "no STOPPING=1 on a clean stop"
                assert not [n for n in notify.notes if n.pid not in (first.pid, second.pid)]
            finally:
                second.close()
        finally:
            notify.close()

    # -- nothing lost, nothing twice: each event one id and one seq, copies only identical re-sends
    events: dict[int, bytes] = {}
    for _, ev, raw in portal.copies:
        assert events.setdefault(ev.seq, raw) == raw, f"seq {ev.seq} arrived as two different events"
    distinct = [json.loads(raw)["events"][0] for _, raw in sorted(events.items())]
    assert [e["seq"] for e in distinct] == list(range(1, COUNT + 1)), "seqs 1..N, no gap"
    assert len({e["id"] for e in distinct}) == COUNT, "one id per event"
    assert [e["data"]["n"] for e in distinct] == list(range(1, COUNT + 1)), "every synthetic event produced once"
    first_seen = portal.first_seen()
    assert all(first_seen[s] > second.started for s in never_sent), (
        "events never published before the kill must have come from the restarted gateway's store"
    )
    assert len(procs.read_rows(db, "SELECT seq FROM events")) == COUNT, "the restart produced nothing twice"
    figures["copies_at_broker"] = len(portal.copies)
    print(f"watchdog restart figures: {json.dumps(figures)}")
