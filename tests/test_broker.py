"""The local broker runner the demo and the tests use."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from gateway.tooling.broker import MosquittoProcess, _ephemeral_range, free_port

ROOT = Path(__file__).resolve().parent.parent


def test_ports_are_chosen_below_the_ephemeral_range() -> None:
    lo, _ = _ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert all(p < lo for p in ports)


def test_a_port_held_for_a_moment_is_waited_for(tmp_path: Path) -> None:
    """A restart on the same port right after a kill may find it briefly held; start() tries again."""
    port = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    timer = threading.Timer(0.8, holder.close)
    timer.start()
    t0 = time.monotonic()
    broker = MosquittoProcess(tmp_path, port).start()
    try:
        assert time.monotonic() - t0 >= 0.7
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        broker.stop()
        timer.join()


def test_restarts_on_the_same_port_after_a_kill_with_the_shipped_persistence(tmp_path: Path) -> None:
    broker = MosquittoProcess(tmp_path).start()
    port = broker.port
    broker.kill()
    broker.start()
    assert broker.port == port and broker.running
    broker.stop()
    conf = (tmp_path / "mosquitto.conf").read_text()
    shipped = (ROOT / "systemd" / "mosquitto-gatehouse.conf").read_text()
    for line in ("persistence true", "autosave_on_changes false", "autosave_interval 30"):
        assert conf.count(line) == 1 and shipped.count(line) == 1, line
