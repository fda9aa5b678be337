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
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import aiomqtt
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ulid import ULID
from yarl import URL

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from gateway.wire.commands import open_command, sign_command
from gateway.wire.passes import keyring
from portal.app import Options, create_app
from portal.config import load
from portal.estate.passes_issue import PUBLIC_KEY_FILE
from portal.store import Postgres, storekey
from portal.store.storekey import StoreKey
from portal.web import scrape
from portal.web.services import SERVICES, Services
from tests.pg_support import store_config_lines
from tests.waiting import wait_for as wait_for  # the portal tests import it from here

ROOT = Path(__file__).resolve().parent.parent
SITE = "s1"
GATEWAY = "gw1"
T = TypeVar("T")


def write_config(
    folder: Path,
    broker: MosquittoProcess | None,
    *,
    gateways: list[tuple[str, str]] | None = None,
    port: int = 0,
    extra: str = "",
    client_id: str = "gatehouse-portal-test",
    mqtt_extra: tuple[str, ...] = (),
) -> Path:
    """A portal config; ``mqtt_extra``: more lines of its mqtt section (``"  username: portal"``)."""
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
        *mqtt_extra,
        "gateways:",
        *[f"  - {{site: {s}, gateway: {g}, name: '{g} 机房'}}" for s, g in gws],
        "log_level: DEBUG",
        *([] if "store:" in extra else store_config_lines(folder.resolve())),
    ]
    path = folder / "portal.yaml"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def event(
    seq: int,
    *,
    type: str = "zone.alarm",
    priority: int = wire.Priority.INTRUSION,
    site: str = SITE,
    ts: datetime | None = None,
    event_id: str | None = None,
    **place: str,
) -> wire.Event:
    ts = ts or datetime.now(UTC)
    return wire.Event(
        id=event_id or str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type=type,
        device="panel-1",
        place=wire.Place(site=site, **(place or {"building": "3", "unit": "2", "zone": f"z{seq}"})),
        point=f"in{seq}",
        priority=priority,
        data={"n": seq},
    )


def batch_payload(events: list[wire.Event], site: str = SITE, gateway: str = GATEWAY) -> bytes:
    return wire.encode(wire.batch_events(site, gateway, events))


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
        """The first administrator's one-time password, from the file (mode 0600) the portal wrote it to."""
        path = self.services.first_admin_file
        assert path is not None, "the store had an administrator already"
        assert path.stat().st_mode & 0o777 == 0o600, oct(path.stat().st_mode)
        return path.read_text(encoding="utf-8").strip()

    @property
    def scrape(self) -> dict[str, str]:
        """The headers of a Prometheus scrape: the portal's scrape token (health details and metrics)."""
        return {"Authorization": f"Bearer {self.client.server.app[scrape.TOKEN]}"}

    async def health(self) -> dict[str, Any]:
        r = await self.client.get("/api/health", headers=self.scrape)
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body

    async def events(self, **query: Any) -> list[dict[str, Any]]:
        r = await self.client.get("/api/events", params={k: str(v) for k, v in query.items()})
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return list(body["events"])


def portal_public_key(p: Portal) -> Path:
    """The public key a gateway needs to take ``p``'s signed passes and commands (``access.public_keys``)."""
    return Path(p.services.cfg.data_dir).resolve() / PUBLIC_KEY_FILE


def store_key(db: Path | Postgres) -> StoreKey:
    """The store key of a test store ``db`` that runs without a portal config: ``<db>.key`` beside it (made, mode
    0600, with a new store), as the portal keeps ``data_dir/store.key``; a PostgreSQL test database's key is beside
    the test server's pgpass file."""
    if isinstance(db, Postgres):
        assert db.passfile is not None
        name = dict(p.split("=", 1) for p in db.dsn.split())["dbname"]
        return storekey.open_for(db.passfile.with_name(name + ".key"), db)
    return storekey.open_for(db.with_name(db.name + ".key"), db)


def scrape_headers(config_path: Path) -> dict[str, str]:
    """The scrape token of the portal of ``config_path`` (a process), as a Prometheus scrape sends it."""
    token = scrape.token_path(load(config_path)).read_text(encoding="utf-8").strip()
    return {"Authorization": f"Bearer {token}"}


async def gateway_online(portal: Portal, gateway: str) -> bool:
    """The portal shows ``gateway`` online: it has connected and subscribed to its commands (a command sent before
    that is not seen)."""
    return any(g["gateway"] == gateway and g["online"] for g in (await portal.health())["gateways"])


@contextlib.asynccontextmanager
async def running_portal(
    config_path: Path, options: Options | None = None, *, last: bool = True
) -> AsyncIterator[Portal]:
    """An in-process portal on the test's loop. ``last=False`` for a portal the test starts again on the same loop
    (a restart): the loop's default executor is left for the next one."""
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
        if last:  # aiomqtt connects on the loop's default executor; end its threads with the test.
            await asyncio.get_running_loop().shutdown_default_executor()


CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "no CSRF field in the page"
    return m.group(1)


async def post_form(
    p: Portal, path: str, data: dict[str, str], *, csrf: str | None = None, origin: str | None = None
) -> ClientResponse:
    form = dict(data)
    if csrf is not None:
        form["csrf"] = csrf
    headers = {"Origin": origin if origin is not None else p.origin}
    return await p.client.post(path, data=form, headers=headers, allow_redirects=False)


async def sign_in(p: Portal, user: str, password: str) -> ClientResponse:
    """Sign in through the real form (GET for the token, POST with it); returns the POST's response."""
    page = await p.client.get("/login")
    return await post_form(
        p, "/login", {"user": user, "password": password, "next": "/console"}, csrf=csrf_of(await page.text())
    )


async def page_csrf(p: Portal, path: str = "/console") -> str:
    r = await p.client.get(path, allow_redirects=False)
    assert r.status == 200, (r.status, r.headers.get("Location"))
    return csrf_of(await r.text())


META_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


class Device:
    """One browser with its own cookie jar at a portal (an in-process :class:`Portal` or a process's origin URL),
    connecting from ``addr`` when that is a loopback address, else from 127.0.0.1 as a proxy that forwards for
    ``addr`` (the portal must list 127.0.0.1 in trusted_proxies)."""

    def __init__(self, portal: Portal | str, addr: str | None) -> None:
        self.origin = portal if isinstance(portal, str) else portal.origin
        local = addr is not None and addr.startswith("127.")
        self.forwarded_for = addr if addr and not local else None
        connector = aiohttp.TCPConnector(local_addr=(addr, 0)) if local else None
        self.http = aiohttp.ClientSession(
            base_url=self.origin, cookie_jar=aiohttp.CookieJar(unsafe=True), connector=connector
        )

    def headers(self, addr: str | None = None) -> dict[str, str]:
        a = addr or self.forwarded_for
        return {"Origin": self.origin, **({"X-Forwarded-For": a} if a else {})}

    async def get(self, path: str) -> ClientResponse:
        return await self.http.get(path, headers=self.headers(), allow_redirects=False)

    async def csrf(self, path: str = "/login") -> str:
        r = await self.http.get(path, headers=self.headers())  # (follows a signed-in /login to the console)
        m = META_CSRF.search(await r.text())
        assert m, f"no CSRF token on {path} ({r.status})"
        return m.group(1)

    async def post(
        self, path: str, data: dict[str, str], *, csrf: str | None = None, addr: str | None = None
    ) -> ClientResponse:
        token = (
            csrf if csrf is not None else await self.csrf("/m/login" if path.startswith(("/m/", "/p/")) else "/login")
        )
        r = await self.http.post(path, data={**data, "csrf": token}, headers=self.headers(addr), allow_redirects=False)
        await r.read()
        return r

    async def sign_in(self, user: str, password: str, *, addr: str | None = None) -> ClientResponse:
        return await self.post("/login", {"user": user, "password": password, "next": "/console"}, addr=addr)

    async def resident_sign_in(self, phone: str, password: str, next: str = "/m") -> ClientResponse:
        return await self.post("/m/login", {"phone": phone, "password": password, "next": next})

    def cookie(self, name: str) -> str | None:
        for c in self.http.cookie_jar:
            if c.key == name:
                return c.value
        return None

    def plant(self, name: str, value: str) -> None:
        self.http.cookie_jar.update_cookies({name: value}, URL(self.origin))

    async def signed_in(self) -> bool:
        r = await self.get("/api/events")
        assert r.status in (200, 401), r.status
        return r.status == 200

    async def resident_signed_in(self) -> bool:
        r = await self.get("/m")
        assert r.status in (200, 303), r.status
        return r.status == 200


@contextlib.asynccontextmanager
async def devices(portal: Portal | str) -> AsyncIterator[Callable[..., Device]]:
    """``new(addr=None)`` makes a :class:`Device`; all are closed at the end."""
    made: list[Device] = []

    def new(addr: str | None = None) -> Device:
        made.append(Device(portal, addr))
        return made[-1]

    try:
        yield new
    finally:
        for d in made:
            await d.http.close()


async def add_user(p: Portal, name: str, role: str, password: str) -> None:
    """Create a user directly through the service (the users page has its own tests)."""
    await p.services.auth.create_user(name, role, password, must_change=False)


# ---------------------------------------------------------------- MQTT


@contextlib.asynccontextmanager
async def mqtt(broker: MosquittoProcess, client_id: str | None = None) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=client_id) as c:
        yield c


def signed_command(
    key: Ed25519PrivateKey,
    type_: str,
    *,
    site: str = SITE,
    gateway: str = GATEWAY,
    by: str = "guard1",
    life_s: float = 30.0,
    **args: Any,
) -> tuple[bytes, str]:
    """A command as the portal signs it for ``site``/``gateway`` with ``key``: (the payload, its id)."""
    now = wire.utcnow()
    cmd = wire.Command(
        v=wire.COMMAND_VERSION,
        id=str(ULID()),
        type=type_,
        ts=now,
        expires=now + timedelta(seconds=life_s),
        by=by,
        args=args,
    )
    return sign_command(key, cmd, site=site, gateway=gateway), cmd.id


def open_portal_command(
    p: Portal, payload: bytes | bytearray | Any, site: str = SITE, gateway: str = GATEWAY
) -> wire.Command:
    """A command the portal ``p`` published, verified as the gateway ``site``/``gateway`` verifies it."""
    assert isinstance(payload, bytes | bytearray), payload
    return open_command(bytes(payload), keyring([p.services.signing_key.public_key()]), site=site, gateway=gateway)


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
        proc = subprocess.Popen(
            [sys.executable, "-m", "portal", "run", "--config", str(config_path)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )
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
    r = await http.post(
        url + "login",
        data={"user": user, "password": password, "csrf": csrf_of(page)},
        headers={"Origin": url.rstrip("/")},
    )
    assert r.status == 200 and str(r.url).endswith("/console"), (r.status, r.url)
