"""`gatehouse demo` as a user runs it: everything starts, the intruder's alarms reach the console's
API, Ctrl-C stops every process, and a second run carries on with the same data."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests import procs

pytestmark = pytest.mark.slow


async def _signed_in_events(url: str, user: str, password: str) -> list[dict[str, object]]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # IP-address cookies
        page = await (await http.get(url + "login")).text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf
        r = await http.post(url + "login", data={"user": user, "password": password, "csrf": csrf.group(1)},
                            headers={"Origin": url.rstrip("/")}, allow_redirects=False)
        assert r.status == 303, await r.text()
        body = await (await http.get(url + "api/events", params={"limit": "500"})).json()
        return list(body["events"])


def _run(tmp_path: Path, name: str) -> procs.Child:
    return procs.Child(name, [procs.PY, "-m", "gateway.cli", "demo", "--data", str(tmp_path / "demo"),
                              "--port", "0", "--intruder-every", "1", "--duration", "60"], tmp_path / "logs")


async def test_demo_runs_alarms_reach_the_console_and_ctrl_c_stops_all(tmp_path: Path) -> None:
    demo = _run(tmp_path, "demo").start(timeout=90)
    try:
        await _exercise(tmp_path, demo)
    finally:
        demo.kill()


async def _exercise(tmp_path: Path, demo: procs.Child) -> None:
    info = demo.info
    children = psutil.Process(demo.proc.pid).children(recursive=True)  # type: ignore[union-attr]
    assert len(children) >= 4, "broker, stub, portal and gateway each run as a process"
    deadline = time.monotonic() + 45
    alarms: list[dict[str, object]] = []
    while time.monotonic() < deadline and not alarms:
        events = await _signed_in_events(str(info["url"]), str(info["user"]), str(info["password"]))
        alarms = [e for e in events if e["type"] == "zone.alarm"]
        if not alarms:
            time.sleep(1)
    assert alarms, f"no zone alarm from the intruder\n{demo.tail()}"
    assert demo.read_until("[intruder] crossing zone")
    demo.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
    assert demo.proc.wait(30) == 0  # type: ignore[union-attr]
    demo.stop()
    for c in children:
        assert not c.is_running() or c.status() == psutil.STATUS_ZOMBIE, f"{c.pid} left running"

    again = _run(tmp_path, "demo-2").start(timeout=90)
    try:
        assert again.info["password"] == info["password"], "the second run uses the same data and accounts"
        events = await _signed_in_events(str(again.info["url"]), str(info["user"]), str(info["password"]))
        assert {e["id"] for e in alarms} <= {e["id"] for e in events}
    finally:
        again.stop()
