"""sd_notify against a real datagram socket: readiness, and a watchdog that a hung loop stops feeding."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.setblocking(False)
    yield s, path
    s.close()


def _drain(s: socket.socket) -> list[tuple[float, str]]:
    out = []
    while True:
        try:
            out.append((time.monotonic(), s.recv(4096).decode()))
        except BlockingIOError:
            return out


def test_ready_and_status(notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.ready("serving")
    assert n.stopping()
    n.close()
    msgs = [m for _, m in _drain(s)]
    assert msgs == ["READY=1\nSTATUS=serving", "STOPPING=1"]


def test_without_systemd_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.ready()
    assert n.watchdog_s is None


@pytest.mark.realtime
async def test_watchdog_fed_while_loop_runs_and_not_while_hung(notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})  # 0.2 s: fed every 0.1 s
    feeder = asyncio.create_task(n.feed_watchdog())
    await asyncio.sleep(0.55)
    fed = [t for t, m in _drain(s) if m == "WATCHDOG=1"]
    assert 4 <= len(fed) <= 8
    time.sleep(0.6)  # the loop hangs: a blocking call, as a stuck driver would make
    await asyncio.sleep(0)  # the loop runs again
    # A running loop would have fed it ~6 times in 0.6 s; the hung one fed it at most once, on waking.
    after = [t for t, m in _drain(s) if m == "WATCHDOG=1"]
    assert len(after) <= 1
    feeder.cancel()
    await asyncio.gather(feeder, return_exceptions=True)
    n.close()


def test_watchdog_for_another_pid_is_ignored() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_s is None


def test_a_vanished_socket_is_logged_once_until_it_works_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "notify.sock")
    n = Notifier({"NOTIFY_SOCKET": path})
    with caplog.at_level("WARNING", logger="common.sdnotify"):
        assert not any(n.send("WATCHDOG=1") for _ in range(50))  # nobody listening: fifty failures
        assert len(caplog.records) == 1 and "failed" in caplog.records[0].getMessage()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(path)
        try:
            assert n.send("WATCHDOG=1") and s.recv(64) == b"WATCHDOG=1"
        finally:
            s.close()
        assert [r.getMessage().endswith("works again") for r in caplog.records] == [False, True]
    n.close()
