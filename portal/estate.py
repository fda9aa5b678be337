"""The running part of the registry: pass signing, revocation publishing, resident sessions, rate limits,
residents' help calls and reports on the console, and door opening from a phone.

:func:`setup` is called by the app factory: it adds the registry and phone routes and a start/stop step
that runs after the portal's own (so the store, the hub and the ingest exist) and stops before them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from ulid import ULID

from gateway import wire
from portal import registry as reg
from portal.ingest import BrokerUnavailable
from portal.passes_issue import PassIssuer, Publisher, load_or_create_key, rebuild_list
from portal.ratelimit import RateLimiter
from portal.services import SERVICES, Services
from portal.store import BatchResult, FnOp, Op, SetStatus, StatusResult, event_dict, now_text

log = logging.getLogger("portal.estate")
T = TypeVar("T")

RESIDENT_COOKIE = "gh_resident"
RESIDENT_IDLE_S = 14 * 86400
RESIDENT_ABSOLUTE_S = 60 * 86400
RESIDENT_MIN_PASSWORD = 8
OTC_LIFE_S = 72 * 3600
UNLOCK_COMMAND_LIFE_S = 30
PORTAL_GATEWAY = "portal"  # the "gateway" of events the portal raises itself (help calls, reports)


@dataclass(frozen=True, slots=True)
class ResidentSession:
    id_hash: str
    person: reg.Person
    created: float
    last_seen: float
    must_set_password: bool


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(eq=False)
class Estate:
    svc: Services
    issuer: PassIssuer
    wall: Callable[[], float] = time.time
    mono: Callable[[], float] = time.monotonic
    publisher: Publisher | None = None
    waiters: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    hasher: PasswordHasher = field(default_factory=PasswordHasher)
    limits: dict[str, RateLimiter] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _dummy_hash: str = ""

    def __post_init__(self) -> None:
        ph = self.svc.cfg.phone
        mk = RateLimiter
        self.limits = {
            "scan": mk(ph.scans_per_min, 60, clock=self.mono),
            "bad-code": mk(ph.bad_codes_per_10min, 600, clock=self.mono),
            "signin-addr": mk(ph.signins_per_15min * 3, 900, clock=self.mono),
            "signin-phone": mk(ph.signins_per_15min, 900, clock=self.mono),
            "register": mk(5, 3600, clock=self.mono),
            "report": mk(10, 3600, clock=self.mono),
            "sos": mk(3, 300, clock=self.mono),
            "visitor": mk(30, 3600, clock=self.mono),
            "unlock": mk(20, 300, clock=self.mono),
        }

    # -- plumbing

    @property
    def cfg(self) -> Any:
        return self.svc.cfg

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self.svc.store.read(fn)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self.svc.store.run_write(fn)

    async def cpu(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.svc.cpu, fn, *args)

    def today(self) -> str:
        return reg.today_in(self.svc.tz, self.wall())

    async def audit(self, actor: str, action: str, target: str = "", detail: str = "", remote: str = "") -> None:
        await self.write(lambda c: reg.audit(c, actor, action, target, detail, remote))

    def spawn(self, coro: Any, name: str) -> None:
        t = asyncio.create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- passwords (argon2id on the worker threads)

    async def hash_password(self, password: str) -> str:
        return await self.cpu(self.hasher.hash, password)

    async def verify_password(self, stored: str | None, password: str) -> bool:
        if not self._dummy_hash:
            self._dummy_hash = await self.hash_password(secrets.token_hex(16))
        target = stored or self._dummy_hash

        def run() -> bool:
            try:
                return bool(self.hasher.verify(target, password[:1024]))
            except (VerificationError, InvalidHashError):
                return False

        ok = await self.cpu(run)
        return ok and stored is not None

    # -- resident sessions

    async def start_resident_session(self, person_id: int, *, must_set_password: bool = False,
                                     old: ResidentSession | None = None) -> str:
        token = secrets.token_urlsafe(32)
        now = self.wall()

        def create(c: sqlite3.Connection) -> None:
            if old is not None:
                c.execute("DELETE FROM resident_sessions WHERE id_hash = ?", (old.id_hash,))
            c.execute("INSERT INTO resident_sessions (id_hash, person_id, created, last_seen, must_set_password)"
                      " VALUES (?, ?, ?, ?, ?)", (_hash(token), person_id, now, now, int(must_set_password)))
            c.execute("DELETE FROM resident_sessions WHERE last_seen < ?", (now - RESIDENT_IDLE_S,))

        await self.write(create)
        return token

    async def resident_session(self, request: web.Request) -> ResidentSession | None:
        token = request.cookies.get(RESIDENT_COOKIE, "")
        if not token or len(token) > 100:
            return None
        h = _hash(token)

        def load(c: sqlite3.Connection) -> tuple[sqlite3.Row, reg.Person] | None:
            row = c.execute("SELECT * FROM resident_sessions WHERE id_hash = ?", (h,)).fetchone()
            if row is None:
                return None
            p = reg.person(c, row["person_id"])
            return (row, p) if p is not None else None

        got = await self.read(load)
        if got is None:
            return None
        row, p = got
        now = self.wall()
        if now - row["created"] > RESIDENT_ABSOLUTE_S or now - row["last_seen"] > RESIDENT_IDLE_S:
            self.svc.store.enqueue_nowait(FnOp(lambda c: c.execute("DELETE FROM resident_sessions WHERE id_hash = ?",
                                                                   (h,))))
            return None
        if now - row["last_seen"] > 60:
            self.svc.store.enqueue_nowait(FnOp(lambda c: c.execute(
                "UPDATE resident_sessions SET last_seen = ? WHERE id_hash = ?", (now, h))))
        return ResidentSession(h, p, row["created"], row["last_seen"], bool(row["must_set_password"]))

    async def end_resident_session(self, s: ResidentSession) -> None:
        await self.write(lambda c: c.execute("DELETE FROM resident_sessions WHERE id_hash = ?", (s.id_hash,)))

    def set_resident_cookie(self, resp: web.StreamResponse, token: str) -> None:
        resp.set_cookie(RESIDENT_COOKIE, token, httponly=True, samesite="Lax", secure=self.cfg.cookie_secure,
                        path="/", max_age=RESIDENT_ABSOLUTE_S)

    async def sign_in(self, phone_raw: str, secret: str, remote: str) -> tuple[reg.Person, bool]:
        """(person, signed in with a one-time code). Raises RegistryError signin.failed / signin.throttled."""
        phone = reg.normalize_phone(phone_raw) or phone_raw[:32]
        if not self.limits["signin-addr"].allow(remote) or not self.limits["signin-phone"].allow(phone):
            raise reg.RegistryError("signin.throttled")
        p = await self.read(lambda c: reg.person_by_phone(c, phone))
        ok = await self.verify_password(p.password_hash if p else None, secret)
        otc = False
        if p is not None and not ok and p.otc_hash and p.otc_expires and p.otc_expires > self.wall():
            given = secret.strip().upper().replace("-", "").replace(" ", "")
            otc = ok = secrets.compare_digest(_hash(given), p.otc_hash)
        if p is None or not ok:
            raise reg.RegistryError("signin.failed")
        if otc:
            await self.write(lambda c: c.execute("UPDATE reg_people SET otc_hash = NULL, otc_expires = NULL"
                                                 " WHERE id = ?", (p.id,)))
        active = [r for r in await self.read(lambda c: reg.residencies_of(c, p.id)) if r.status == "active"]
        if not active:
            raise reg.RegistryError("signin.no_home")
        return p, otc

    async def one_time_code(self, person_id: int, actor: str) -> str:
        code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(10))
        expires = self.wall() + OTC_LIFE_S

        def put(c: sqlite3.Connection) -> None:
            c.execute("UPDATE reg_people SET otc_hash = ?, otc_expires = ? WHERE id = ?", (_hash(code), expires,
                                                                                           person_id))
            reg.audit(c, actor, "resident.code", f"person:{person_id}")

        await self.write(put)
        return f"{code[:5]}-{code[5:]}"

    # -- passes and revocations

    async def rebuild(self, site: str) -> Any:
        issuer, tz, wall = self.issuer, self.svc.tz, self.wall()
        return await self.write(lambda c: rebuild_list(c, issuer, site, tz, wall))

    async def refresh_revocations(self, site: str | None = None) -> None:
        if self.publisher is not None:
            await self.publisher.refresh(site)

    # -- help calls and problem reports: portal-originated events and work items

    async def raise_work_item(self, place: reg.Place, kind: str, *, category: str = "", text: str = "",
                              photo: bytes | None = None, photo_type: str | None = None) -> int:
        assert place.house_id is not None
        etype = "house.sos" if kind == "sos" else "house.problem"
        priority = int(wire.Priority.PANIC if kind == "sos" else wire.Priority.FAULT)
        wplace = {"site": place.site, "building": place.building, "unit": place.unit, "house": place.house}

        def op(c: sqlite3.Connection) -> tuple[dict[str, Any], int]:
            now = now_text()
            wid = int(c.execute(
                "INSERT INTO work_items (kind, house_id, category, text, photo, photo_type, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, place.house_id, category, text, photo, photo_type, now, now)).lastrowid or 0)
            seq = int(c.execute("SELECT coalesce(max(seq), 0) + 1 FROM events WHERE site = ? AND gateway = ?",
                                (place.site, PORTAL_GATEWAY)).fetchone()[0])
            data = {"work_item": wid, "kind": kind}
            if category:
                data["category"] = category
            if photo:
                data["photo"] = True
            row = (str(ULID()), place.site, PORTAL_GATEWAY, seq, now, etype, "phone", None, priority,
                   json.dumps(wplace, ensure_ascii=False), json.dumps(data, ensure_ascii=False), now)
            c.execute("INSERT INTO events (id, site, gateway, seq, ts, type, device, point, priority, place, data,"
                      " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            c.execute("UPDATE work_items SET event_id = ? WHERE id = ?", (row[0], wid))
            return event_dict(row), wid

        ev, wid = await self.write(op)
        self.svc.hub.broadcast({"kind": "event", "event": ev})
        log.warning("%s from %s (work item %d)", etype, place.short_zh, wid)
        return wid

    # -- doors

    async def unlock(self, door: reg.Door, by: str) -> str:
        """sent (no answer in time), opened, or failed."""
        now = datetime.now(UTC)
        cmd = wire.Command(v=wire.SCHEMA_VERSION, id=str(ULID()), type="unlock", ts=now,
                           expires=now + timedelta(seconds=UNLOCK_COMMAND_LIFE_S), by=by,
                           args={"door": door.door, "reason": "resident phone"})
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiters[cmd.id] = fut
        try:
            try:
                await self.svc.ingest.send_command(door.site, door.gateway, cmd)
            except (BrokerUnavailable, ValueError, wire.WireError) as e:
                log.info("unlock of %s not sent: %s", door.door, e)
                return "failed"
            try:
                async with asyncio.timeout(self.cfg.phone.unlock_wait_s):
                    data = await fut
            except TimeoutError:
                return "sent"
            return "opened" if data.get("ok") is True else "failed"
        finally:
            self.waiters.pop(cmd.id, None)

    # -- what the ingest commits

    def on_commit(self, committed: list[tuple[Op, Any]]) -> None:
        for op, res in committed:
            if isinstance(res, BatchResult):
                for e in res.new_events:
                    if e["type"] != "command.result" or not isinstance(e.get("data"), dict):
                        continue
                    cid = e["data"].get("command_id")
                    if not isinstance(cid, str):
                        continue
                    fut = self.waiters.get(cid)
                    if fut is not None and not fut.done():
                        fut.set_result(e["data"])
                    if self.publisher is not None:
                        self.publisher.on_result(res.site, res.gateway, cid, e["data"].get("ok") is True)
            elif (isinstance(res, StatusResult) and isinstance(op, SetStatus) and res.changed
                  and res.snapshot.status == "online" and self.publisher is not None):
                pub = self.publisher
                self.spawn(pub.refresh(op.site, force_gateway=(op.site, op.gateway)),
                           f"portal.revocations[{op.site}/{op.gateway}]")

    async def run_timer(self) -> None:
        every = self.cfg.phone.revocations_every_s
        while True:
            try:
                await self.refresh_revocations()
            except Exception:
                log.exception("revocation refresh failed")
            await asyncio.sleep(every)


ESTATE = web.AppKey("portal.estate", Estate)


def setup(app: web.Application, *, wall: Callable[[], float] = time.time,
          mono: Callable[[], float] = time.monotonic) -> None:
    from portal import phone, registry_views

    app.router.add_routes(phone.routes)
    app.router.add_routes(registry_views.routes)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        svc = app[SERVICES]
        key = await asyncio.get_running_loop().run_in_executor(svc.cpu, load_or_create_key,
                                                               Path(svc.cfg.data_dir))
        est = Estate(svc=svc, issuer=PassIssuer(key, now=wall), wall=wall, mono=mono)
        est.publisher = Publisher([(g.site, g.gateway) for g in svc.cfg.gateways], est.rebuild,
                                  svc.ingest.send_command)
        svc.store.add_commit_listener(est.on_commit)
        app[ESTATE] = est
        timer = asyncio.create_task(est.run_timer(), name="portal.revocations")
        try:
            yield
        finally:
            timer.cancel()
            for t in list(est._tasks):
                t.cancel()
            for t in [timer, *est._tasks]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            for fut in est.waiters.values():
                fut.cancel()

    app.cleanup_ctx.append(ctx)
