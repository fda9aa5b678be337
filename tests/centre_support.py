"""Helpers for the monitoring centre's tests and benchmark: a portal instance's config on a shared PostgreSQL
store, the keys every instance must share, and a console as the console shell runs it (the socket, a reload of
the open alarms at every connect, reconnecting after half a second)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.tooling.broker import MosquittoProcess
from portal.store import Postgres
from tests.portal_support import Portal, csrf_of, write_config

#: what every instance of one centre must hold alike (docs/centre.md): the store key and the signing key
SHARED_KEYS = ("store.key", "pass_signing_key.pem")


def instance_config(
    folder: Path,
    *,
    broker_port: int,
    target: Postgres,
    client_id: str,
    gateways: list[tuple[str, str]],
    share_group: str = "centre",
    port: int = 0,
    extra: str = "",
    log_level: str = "INFO",
) -> Path:
    """One portal instance of a centre: its own data_dir, listen port and MQTT client id; the shared store and
    shared-subscription group."""
    folder.mkdir(parents=True, exist_ok=True)
    gws = "\n".join(f"  - {{site: {s}, gateway: {g}, name: '{g} 机房'}}" for s, g in gateways)
    path = folder / "portal.yaml"
    path.write_text(
        f"""site_name: 监控中心
data_dir: data
listen: {{host: 127.0.0.1, port: {port}}}
mqtt:
  host: 127.0.0.1
  port: {broker_port}
  client_id: {client_id}
  share_group: '{share_group}'
  reconnect_min_s: 0.1
  reconnect_max_s: 1.0
gateways:
{gws}
store: {{backend: postgresql, dsn: '{target.dsn}', passfile: {target.passfile}}}
log_level: {log_level}
{extra}""",
        encoding="utf-8",
    )
    return path


def share_keys(first: Path, others: list[Path]) -> None:
    """Copy the first instance's store key and signing key (mode 0600) into the other instances' data_dirs."""
    for folder in others:
        (folder / "data").mkdir(parents=True, exist_ok=True)
        for name in SHARED_KEYS:
            src = first / "data" / name
            if src.exists():
                dst = folder / "data" / name
                shutil.copyfile(src, dst)
                dst.chmod(0o600)


def in_process_config(
    folder: Path,
    target: Postgres,
    first: Portal | None = None,
    broker: MosquittoProcess | None = None,
    *,
    gateways: list[tuple[str, str]] | None = None,
    client_id: str | None = None,
    extra: str = "",
) -> Path:
    """The config of an in-process instance (tests.portal_support.running_portal) on the shared store ``target``;
    ``first``: the instance whose store key it takes (copied into its folder, mode 0600), as every instance must;
    ``broker``: the centre's broker, joined with a client id of its own (``client_id``, else from the folder's name)
    in the shared-subscription group; ``extra``: more of the config (YAML)."""
    key = ""
    if first is not None:
        dst = folder / "store.key"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first.services.cfg.key_path, dst)
        dst.chmod(0o600)
        key = f", key_file: {dst}"
    store = f"store: {{backend: postgresql, dsn: '{target.dsn}', passfile: {target.passfile}{key}}}\n"
    if broker is None:
        return write_config(folder, None, gateways=gateways, extra=store + extra)
    return write_config(
        folder,
        broker,
        gateways=gateways,
        extra=store + extra,
        client_id=client_id or f"centre-{folder.name}",
        mqtt_extra=("  share_group: centre",),
    )


async def sign_in(http: aiohttp.ClientSession, url: str, user: str, password: str) -> None:
    """Sign ``http`` in at ``url`` (ends in /) as a staff user."""
    page = await (await http.get(url + "login")).text()
    r = await http.post(
        url + "login",
        data={"user": user, "password": password, "csrf": csrf_of(page)},
        headers={"Origin": url.rstrip("/")},
        allow_redirects=False,
    )
    assert r.status == 303, (r.status, await r.text())


class Console:
    """A guard's console as the shell runs it: the socket (``?after=`` the newest event it has), the open alarms
    reloaded at every connect, a new connection half a second after one ends. It keeps when each event and incident
    first reached it (monotonic), and how."""

    def __init__(self, name: str, url: str, user: str, password: str) -> None:
        self.name = name
        self.url = url
        self.user, self.password = user, password
        # one connection per request, as through a balancer: only the socket stays open
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), connector=aiohttp.TCPConnector(force_close=True)
        )
        self.events: dict[str, float] = {}  # event id -> when it arrived (live)
        self.incidents: dict[int, float] = {}  # incident id -> when it was first known (live or reloaded)
        self.connects = 0
        self.drops: list[float] = []  # when a socket ended
        self.last_id = ""
        self.open = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Console:
        await sign_in(self.http, self.url, self.user, self.password)
        self._task = asyncio.create_task(self._run(), name=f"console[{self.name}]")
        async with asyncio.timeout(30):
            await self.open.wait()
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.http.close()

    async def _reload(self) -> None:
        async with self.http.get(self.url + "api/board") as r:
            if r.status == 200:
                now = time.monotonic()
                for inc in (await r.json())["incidents"]:
                    self.incidents.setdefault(int(inc["id"]), now)

    async def _run(self) -> None:
        while True:
            q = f"?after={self.last_id}" if self.last_id else ""
            try:
                async with self.http.ws_connect(
                    self.url + "ws" + q, headers={"Origin": self.url.rstrip("/")}, heartbeat=None
                ) as ws:
                    self.connects += 1
                    self.open.set()
                    await self._reload()
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue
                        self._take(json.loads(msg.data))
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            self.drops.append(time.monotonic())
            self.open.clear()
            await asyncio.sleep(0.5)

    def _take(self, m: dict[str, Any]) -> None:
        now = time.monotonic()
        kind = m.get("kind")
        if kind == "event":
            eid = m["event"]["id"]
            self.events.setdefault(eid, now)
            self.last_id = max(self.last_id, eid)
        elif kind == "incident":
            self.incidents.setdefault(int(m["incident"]["id"]), now)
