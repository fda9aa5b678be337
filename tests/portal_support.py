"""Helpers for the portal tests: configs, an in-process portal on the test's loop, a portal process,
a test MQTT client, wire events, and sign-in over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import aiomqtt
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from ulid import ULID

from gateway import wire
from gateway.broker import MosquittoProcess
from portal.app import Options, create_app
from portal.config import load
from portal.services import SERVICES, Services

ROOT = Path(__file__).resolve().parent.parent
SITE = "s1"
GATEWAY = "gw1"
T = TypeVar("T")


def write_config(folder: Path, broker: MosquittoProcess | None, *, gateways: list[tuple[str, str]] | None = None,
                 port: int = 0, extra: str = "", client_id: str = "gatehouse-portal-test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    gws = gateways if gateways is not None else [(SITE, GATEWAY)]
    lines = [
        "site_name: 阳光花园",
        "data_dir: data",
        f"listen: {{host: 127.0.0.1, port: {port}}}",
        "mqtt:",
        "  host: 127.0.0.1",
        f"  port: {broker.port if broker else 1}",
        f"  client_id: {client_id}",
        "  reconnect_min_s: 0.1",
        "  reconnect_max_s: 1.0",
        "gateways:",
        *[f"  - {{site: {s}, gateway: {g}, name: '{g} 机房'}}" for s, g in gws],
        "log_level: DEBUG",
    ]
    path = folder / "portal.yaml"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def event(seq: int, *, type: str = "zone.alarm", priority: int = wire.Priority.INTRUSION, site: str = SITE,
          ts: datetime | None = None, event_id: str | None = None, **place: str) -> wire.Event:
    ts = ts or datetime.now(UTC)
    return wire.Event(
        id=event_id or str(ULID.from_datetime(ts)), seq=seq, ts=ts, type=type, device="panel-1",
        place=wire.Place(site=site, **(place or {"building": "3", "unit": "2", "zone": f"z{seq}"})),
        point=f"in{seq}", priority=priority, data={"n": seq},
    )


def batch_payload(events: list[wire.Event], site: str = SITE, gateway: str = GATEWAY) -> bytes:
    return wire.encode(wire.batch_events(site, gateway, events))


async def wait_for(check: Callable[[], Awaitable[T | None] | T | None], *, timeout: float = 10.0,
                   interval: float = 0.05, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy (end-to-end tests only)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last) or isinstance(last, Awaitable):
            last = await last
        if last:
            return last  # type: ignore[no-any-return]
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# ---------------------------------------------------------------- an in-process portal


@dataclass
class Portal:
    client: TestClient[Any, Any]
    services: Services
    origin: str
    csrf: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def admin_password(self) -> str:
        pw = self.services.first_admin_password
        assert pw, "the store had users already"
        return pw

    async def health(self) -> dict[str, Any]:
        r = await self.client.get("/api/health")
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body

    async def events(self, **query: Any) -> list[dict[str, Any]]:
        r = await self.client.get("/api/events", params={k: str(v) for k, v in query.items()})
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return list(body["events"])


@contextlib.asynccontextmanager
async def running_portal(config_path: Path, options: Options | None = None) -> AsyncIterator[Portal]:
    cfg = load(config_path)
    app = create_app(cfg, options)
    server = TestServer(app, host="127.0.0.1")
    client: TestClient[Any, Any] = TestClient(server)
    await client.start_server()
    try:
        origin = f"http://127.0.0.1:{server.port}"
        yield Portal(client=client, services=app[SERVICES], origin=origin)
    finally:
        await client.close()
        # aiomqtt connects on the loop's default executor; end its threads with the test.
        await asyncio.get_running_loop().shutdown_default_executor()


CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "no CSRF field in the page"
    return m.group(1)


async def post_form(p: Portal, path: str, data: dict[str, str], *, csrf: str | None = None,
                    origin: str | None = None) -> ClientResponse:
    form = dict(data)
    if csrf is not None:
        form["csrf"] = csrf
    headers = {"Origin": origin if origin is not None else p.origin}
    return await p.client.post(path, data=form, headers=headers, allow_redirects=False)


async def sign_in(p: Portal, user: str, password: str) -> ClientResponse:
    """Sign in through the real form (GET for the token, POST with it); returns the POST's response."""
    page = await p.client.get("/login")
    return await post_form(p, "/login", {"user": user, "password": password, "next": "/console"},
                           csrf=csrf_of(await page.text()))


async def page_csrf(p: Portal, path: str = "/console") -> str:
    r = await p.client.get(path, allow_redirects=False)
    assert r.status == 200, (r.status, r.headers.get("Location"))
    return csrf_of(await r.text())


async def add_user(p: Portal, name: str, role: str, password: str) -> None:
    """Create a user directly through the service (the users page has its own tests)."""
    await p.services.auth.create_user(name, role, password, must_change=False)


# ---------------------------------------------------------------- MQTT


@contextlib.asynccontextmanager
async def mqtt(broker: MosquittoProcess, client_id: str | None = None) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=client_id) as c:
        yield c


async def next_ack(client: aiomqtt.Client, timeout: float = 10.0) -> wire.Ack:
    async with asyncio.timeout(timeout):
        async for m in client.messages:
            if str(m.topic).endswith("/ack"):
                payload = m.payload
                assert isinstance(payload, bytes | bytearray)
                return wire.decode_ack(bytes(payload))
    raise AssertionError("message stream ended")


# ---------------------------------------------------------------- a portal process


@dataclass
class PortalProcess:
    proc: subprocess.Popen[bytes]
    url: str
    first_admin: dict[str, Any] | None
    stderr_path: Path

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        return int(self.proc.returncode)


def read_json_line(stream: Any, deadline: float) -> dict[str, Any]:
    buf = b""
    fd = stream.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        ch = os.read(fd, 1)
        if not ch:
            raise AssertionError(f"portal stdout closed (partial line {buf!r})")
        if ch == b"\n":
            return dict(json.loads(buf))
        buf += ch
    raise AssertionError(f"no line from the portal in time (partial {buf!r})")


@contextlib.contextmanager
def portal_process(config_path: Path, timeout: float = 20.0) -> Iterator[PortalProcess]:
    stderr_path = config_path.parent / "portal.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "portal", "run", "--config", str(config_path)],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    pp: PortalProcess | None = None
    try:
        deadline = time.monotonic() + timeout
        first_admin = None
        assert proc.stdout is not None
        while True:
            try:
                line = read_json_line(proc.stdout, deadline)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{stderr_path.read_text(errors='replace')[-2000:]}") from None
            if "first_admin" in line:
                first_admin = line["first_admin"]
                continue
            assert line.get("ready") is True, line
            pp = PortalProcess(proc, line["url"], first_admin, stderr_path)
            break
        yield pp
    finally:
        if pp is not None:
            pp.stop()
        else:
            proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()


async def sign_in_console(http: aiohttp.ClientSession, url: str, user: str, password: str) -> None:
    """Sign ``http`` in at a running portal (``url`` ends in /) as a staff user and land on the console."""
    page = await (await http.get(url + "login")).text()
    r = await http.post(url + "login", data={"user": user, "password": password, "csrf": csrf_of(page)},
                        headers={"Origin": url.rstrip("/")})
    assert r.status == 200 and str(r.url).endswith("/console"), (r.status, r.url)
