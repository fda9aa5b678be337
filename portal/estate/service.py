"""The running part of the registry: pass signing, revocation publishing, residents' secrets and sessions, rate
limits, residents' help calls and reports on the console, and door opening from a phone.

Residents' secrets (to OWASP ASVS 4.0 L2, as the staff's): a password of 12 to 1024 characters, argon2id at the
staff's configured cost (redone at the next sign-in when the cost changes), or a one-time code from the property
office (valid 72 hours, once). Every place that checks one (sign-in, re-authentication, the current password at
a change) goes through :meth:`Estate.check_secret`, which counts failures in one :class:`portal.web.auth.SignInLocks`
keyed by phone number, address (IPv6 by /64) and both, exactly as staff sign-ins are counted by user name. A
number without an approved, current home fails exactly like a wrong password. A session lasts at most 30 days
(14 idle); approving a household member and a visitor pass over 24 hours need a secret given in the last
:data:`REAUTH_S` seconds, and so does a password change (the current password, or the fresh one-time code the
session was opened with).

:func:`setup` is called by the package's (:func:`portal.estate.setup`, which adds the registry and phone routes): it
adds a start/stop step that runs after the portal's own (so the store, the hub and the ingest exist) and stops before
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from aiohttp import web
from ulid import ULID

from gateway import wire
from portal.estate import photos
from portal.estate import registry as reg
from portal.estate.passes_issue import PassIssuer, Publisher, rebuild_list
from portal.store import BatchResult, Conn, FnOp, Op, Row, SetStatus, StatusResult, db, event_dict, now_text
from portal.web.auth import MAX_PASSWORD, MIN_PASSWORD, Attempt, sign_in_locks
from portal.web.ingest import BrokerUnavailable
from portal.web.ratelimit import Limiter, limiter
from portal.web.services import SERVICES, Services

log = logging.getLogger("portal.estate")
T = TypeVar("T")

RESIDENT_COOKIE = "gh_resident"
RESIDENT_IDLE_S = 14 * 86400
RESIDENT_ABSOLUTE_S = 30 * 86400
REAUTH_S = 15 * 60  # a secret given this recently allows the sensitive acts (and, after a one-time code, a password)
OTC_LIFE_S = 72 * 3600
# resident_sessions.must_set_password: why the session is asked for a new password
MUST_SET_AFTER_CODE = 1  # opened with a one-time code from the office
MUST_SET_TOO_SHORT = 2  # opened with a password shorter than today's minimum
PORTAL_GATEWAY = "portal"  # the "gateway" of events the portal raises itself (help calls, reports)


def portal_event(
    c: Conn,
    place: dict[str, Any],
    etype: str,
    priority: int,
    data: dict[str, Any],
    *,
    device: str = "phone",
    point: str | None = None,
    ts: str | None = None,
) -> tuple[Any, ...]:
    """Store an event the portal raises itself (help calls, reports, care alerts, patrol alerts) under the gateway
    name :data:`PORTAL_GATEWAY` with the site's next sequence number, in the caller's transaction; the alarm board's
    feed makes an incident of it like of any gateway event (``device`` and ``point`` name its source: alarms of one
    source fold into its open incident). ``ts``: the event's time (UTC text), default now.
    Returns the stored row (:data:`portal.store.EVENT_COLUMNS`)."""
    now = ts or now_text()
    site = str(place["site"])
    seq = int(
        c.execute(
            "SELECT coalesce(max(seq), 0) + 1 FROM events WHERE site = ? AND gateway = ?", (site, PORTAL_GATEWAY)
        ).fetchone()[0]
    )
    row = (
        str(ULID()),
        site,
        PORTAL_GATEWAY,
        seq,
        now,
        etype,
        device,
        point,
        priority,
        json.dumps({k: v for k, v in place.items() if v is not None}, ensure_ascii=False),
        json.dumps(data, ensure_ascii=False),
        now,
    )
    c.execute(
        "INSERT INTO events (id, site, gateway, seq, ts, type, device, point, priority, place, data,"
        " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        row,
    )
    return row


@dataclass(frozen=True, slots=True)
class ResidentSession:
    id_hash: str
    person: reg.Person
    created: float
    last_seen: float
    must_set_password: int  # 0, MUST_SET_AFTER_CODE or MUST_SET_TOO_SHORT
    auth_at: float  # when a secret was last given in this session (wall clock)


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
    limits: dict[str, Limiter] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    #: ``hook(conn, work_item_id)`` inside the transaction that changed a problem report's handling (the grid link)
    work_hooks: list[Callable[[Conn, int], None]] = field(default_factory=list)
    #: whether a guard may forward a site's problem reports up to the grid platform (set by the grid link)
    forwardable: Callable[[str], bool] = field(default=lambda site: False)
    #: public reports' photos are decoded one at a time: a stream of them keeps a CPU thread for sign-ins and passes
    photo_slot: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))

    def __post_init__(self) -> None:
        ph = self.svc.cfg.phone
        store = self.svc.store
        # residents' phone numbers, the staff's policy
        self.signin_locks = sign_in_locks(self.svc.cfg.auth, store, "resident", self.mono, self.wall)
        rates = (
            ("scan", ph.scans_per_min, 60),
            ("bad-code", ph.bad_codes_per_10min, 600),
            ("register", 5, 3600),
            ("report", 10, 3600),
            ("sos", 3, 300),
            ("visitor", 30, 3600),
            ("unlock", 20, 300),
        )
        self.limits = {
            name: limiter(store, name, rate, per_s, clock=self.mono, wall=self.wall) for name, rate, per_s in rates
        }

    # -- plumbing

    @property
    def cfg(self) -> Any:
        return self.svc.cfg

    async def read(self, fn: Callable[[Conn], T]) -> T:
        return await self.svc.store.read(fn)

    async def write(self, fn: Callable[[Conn], T]) -> T:
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

    # -- passwords (argon2id on the worker threads, at the staff's configured cost)

    async def hash_password(self, password: str) -> str:
        return await self.svc.auth.hash_password(password)

    # -- resident sessions

    async def start_resident_session(
        self, person_id: int, *, must_set_password: int = 0, old: ResidentSession | None = None
    ) -> str:
        token = secrets.token_urlsafe(32)
        now = self.wall()

        def create(c: Conn) -> None:
            if old is not None:
                c.execute("DELETE FROM resident_sessions WHERE id_hash = ?", (old.id_hash,))
            c.execute(
                "INSERT INTO resident_sessions (id_hash, person_id, created, last_seen, must_set_password,"
                " auth_at) VALUES (?, ?, ?, ?, ?, ?)",
                (_hash(token), person_id, now, now, int(must_set_password), now),
            )
            c.execute(
                "DELETE FROM resident_sessions WHERE last_seen < ? OR created < ?",
                (now - RESIDENT_IDLE_S, now - RESIDENT_ABSOLUTE_S),
            )

        await self.write(create)
        return token

    async def resident_session(self, request: web.Request) -> ResidentSession | None:
        token = request.cookies.get(RESIDENT_COOKIE, "")
        if not token or len(token) > 100:
            return None
        h = _hash(token)

        def load(c: Conn) -> tuple[Row, reg.Person] | None:
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
            self.svc.store.enqueue_nowait(
                FnOp(lambda c: c.execute("DELETE FROM resident_sessions WHERE id_hash = ?", (h,)))
            )
            return None
        if now - row["last_seen"] > 60:
            self.svc.store.enqueue_nowait(
                FnOp(lambda c: c.execute("UPDATE resident_sessions SET last_seen = ? WHERE id_hash = ?", (now, h)))
            )
        return ResidentSession(
            h, p, row["created"], row["last_seen"], int(row["must_set_password"]), float(row["auth_at"])
        )

    def fresh(self, rs: ResidentSession) -> bool:
        """Was a secret given in this session in the last :data:`REAUTH_S` seconds?"""
        return 0 <= self.wall() - rs.auth_at <= REAUTH_S

    async def mark_fresh(self, rs: ResidentSession) -> None:
        now = self.wall()
        await self.write(
            lambda c: c.execute("UPDATE resident_sessions SET auth_at = ? WHERE id_hash = ?", (now, rs.id_hash))
        )

    async def end_resident_session(self, s: ResidentSession) -> None:
        await self.write(lambda c: c.execute("DELETE FROM resident_sessions WHERE id_hash = ?", (s.id_hash,)))

    def set_resident_cookie(self, resp: web.StreamResponse, token: str) -> None:
        resp.set_cookie(
            RESIDENT_COOKIE,
            token,
            httponly=True,
            samesite="Lax",
            secure=self.cfg.cookie_secure,
            path="/",
            max_age=RESIDENT_ABSOLUTE_S,
        )

    # -- residents' secrets: the one check, the one limiter

    async def check_secret(
        self, phone_raw: str, secret: str, remote: str, *, person: reg.Person | None = None, purpose: str = "signin"
    ) -> tuple[reg.Person, bool]:
        """(the person, whether the secret was a one-time code), for a password or a one-time code from the office.

        ``person``: a signed-in person giving their secret again (``purpose``: reauth, password.current); else the
        person of ``phone_raw``, who must have an approved, current home (signing in). An unknown number, a wrong
        secret and a number without a home all fail alike, at the same cost; every failure counts in
        :attr:`signin_locks` and is audited. Raises RegistryError ``signin.failed``, or ``signin.throttled`` with
        ``retry_after`` (seconds). A one-time code works once; a password hash of an old cost is redone."""
        phone = person.phone if person is not None else (reg.normalize_phone(phone_raw) or phone_raw.strip()[:32])
        at = await self.signin_locks.attempt(phone, remote)
        retry, scopes, first = await self.signin_locks.check(at)
        if retry:
            if first:  # one audit row per lock, not per hammered request
                await self.audit(
                    self._actor(person),
                    f"{purpose}.refused",
                    self._target(phone),
                    f"locked ({', '.join(scopes)}) for {retry} s more",
                    at.remote,
                )
            log.info("resident %s refused from %s: %s locked", purpose, at.remote, "/".join(scopes))
            raise reg.RegistryError("signin.throttled", retry_after=retry)
        pid = person.id if person is not None else None
        p = await self.read(lambda c: reg.person(c, pid) if pid is not None else reg.person_by_phone(c, phone))
        if len(secret) > MAX_PASSWORD:
            p = None
        ok = await self.svc.auth.check_password(p.password_hash if p else None, secret)
        otc = False
        if p is not None and not ok and p.otc_hash and p.otc_expires and p.otc_expires > self.wall():
            given = secret.strip().upper().replace("-", "").replace(" ", "")
            otc = ok = secrets.compare_digest(_hash(given), p.otc_hash)
        why = "wrong secret" if p is not None else "unknown number"
        if ok and p is not None and person is None:
            today, signer = self.today(), p.id
            if not reg.has_home(await self.read(lambda c: reg.residencies_of(c, signer)), today):
                ok, why = False, "no current home"
        if not ok or p is None:
            await self._failed(at, person or p, purpose, why)
            raise reg.RegistryError("signin.failed")
        await self.signin_locks.succeeded(at)
        stored = p.password_hash
        new_hash = (
            await self.hash_password(secret)
            if not otc and stored is not None and self.svc.auth.needs_rehash(stored)
            else None
        )
        actor = f"resident:{p.id}"
        found = p

        def record(c: Conn) -> None:
            if otc:
                c.execute("UPDATE reg_people SET otc_hash = NULL, otc_expires = NULL WHERE id = ?", (found.id,))
            if new_hash is not None:  # only over the hash just checked
                c.execute(
                    "UPDATE reg_people SET password_hash = ? WHERE id = ? AND password_hash = ?",
                    (new_hash, found.id, stored),
                )
            reg.audit(
                c,
                actor,
                purpose,
                detail=", ".join(x for x in ("one-time code" if otc else "", "rehashed" if new_hash else "") if x),
                remote=at.remote,
            )

        await self.write(record)
        return p, otc

    @staticmethod
    def _actor(person: reg.Person | None) -> str:
        return f"resident:{person.id}" if person is not None else "public"

    @staticmethod
    def _target(phone: str) -> str:
        """A number as guards see it (masked); never what was typed when it is not a number (it may be a secret)."""
        number = reg.normalize_phone(phone)
        return f"phone:{reg.mask_phone(number)}" if number else "phone:?"

    async def _failed(self, at: Attempt, person: reg.Person | None, purpose: str, why: str) -> None:
        started = await self.signin_locks.failed(at)
        actor, target = self._actor(person) if purpose != "signin" else "public", self._target(at.name)

        def record(c: Conn) -> None:
            reg.audit(c, actor, f"{purpose}.failed", target, why, at.remote)
            for scope, length in started:
                reg.audit(c, actor, f"{purpose}.lock", target, f"{scope} locked for {length:.0f} s", at.remote)

        await self.write(record)
        log.info(
            "resident %s failed from %s (%s)%s",
            purpose,
            at.remote,
            why,
            "".join(f"; {scope} locked for {length:.0f} s" for scope, length in started),
        )

    async def sign_in(self, phone_raw: str, secret: str, remote: str) -> tuple[reg.Person, int]:
        """(person, why the new session must set a password: 0 or MUST_SET_*). See :meth:`check_secret`."""
        p, otc = await self.check_secret(phone_raw, secret, remote)
        must = MUST_SET_AFTER_CODE if otc else (MUST_SET_TOO_SHORT if len(secret) < MIN_PASSWORD else 0)
        return p, must

    async def set_password(self, rs: ResidentSession, new_hash: str, *, after_code: bool, remote: str) -> str:
        """A new password for the session's person: every session of theirs ends, a new (fresh) one is returned.
        ``after_code``: the change was authorised by a one-time code from the office, so no request chose it."""
        token = secrets.token_urlsafe(32)
        now, pid = self.wall(), rs.person.id

        def put(c: Conn) -> None:
            c.execute(
                "UPDATE reg_people SET password_hash = ?, password_request = CASE WHEN ? = 1 THEN NULL"
                " ELSE password_request END WHERE id = ?",
                (new_hash, int(after_code), pid),
            )
            c.execute("DELETE FROM resident_sessions WHERE person_id = ?", (pid,))
            c.execute(
                "INSERT INTO resident_sessions (id_hash, person_id, created, last_seen, must_set_password,"
                " auth_at) VALUES (?, ?, ?, ?, 0, ?)",
                (_hash(token), pid, now, now, now),
            )
            reg.audit(
                c,
                f"resident:{pid}",
                "password.change",
                f"person:{pid}",
                "after a one-time code; other sessions ended" if after_code else "other sessions ended",
                remote[:64],
            )

        await self.write(put)
        return token

    async def one_time_code(self, person_id: int, actor: str) -> str:
        code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(10))
        expires = self.wall() + OTC_LIFE_S

        def put(c: Conn) -> None:
            c.execute(
                "UPDATE reg_people SET otc_hash = ?, otc_expires = ? WHERE id = ?", (_hash(code), expires, person_id)
            )
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

    # -- help calls and problem reports: portal-originated events (a report is also a work item)

    @staticmethod
    def _event_row(c: Conn, place: reg.Place, etype: str, priority: int, data: dict[str, Any]) -> tuple[Any, ...]:
        wplace = {"site": place.site, "building": place.building, "unit": place.unit, "house": place.house}
        return portal_event(c, wplace, etype, priority, data)

    async def raise_sos(self, place: reg.Place, token: str) -> str:
        """A help call from a house plate: one event, which the alarm board makes one incident (a second press
        while it is open folds into it). ``token`` is the pressing phone's; the event keeps only its digest, so
        that phone (and the house's signed-in residents) can follow the call's state. Returns the event id."""
        assert place.house_id is not None
        data = {"kind": "sos", "token": _hash(token)}

        def op(c: Conn) -> dict[str, Any]:
            return event_dict(self._event_row(c, place, "house.sos", int(wire.Priority.PANIC), data))

        ev = await self.write(op)
        self.svc.hub.broadcast({"kind": "event", "event": ev})
        log.warning("house.sos from %s (event %s)", place.short_zh, ev["id"])
        return str(ev["id"])

    async def raise_work_item(
        self,
        place: reg.Place,
        kind: str,
        *,
        category: str = "",
        text: str = "",
        photo: photos.Photo | None = None,
        token: str | None = None,
    ) -> int:
        """A problem report as a work item and a portal-raised event. ``photo``: only one
        :func:`portal.estate.photos.clean` made, so what is stored has no metadata. ``token`` is the reporting phone's
        (its event keeps only the
        digest), so that phone can follow the report (:meth:`report_states`)."""
        assert place.house_id is not None and kind == "problem"

        def op(c: Conn) -> tuple[dict[str, Any], int]:
            now = now_text()
            wid = int(
                c.execute(
                    "INSERT INTO work_items (kind, house_id, category, text, photo, photo_type, photo_clean,"
                    " created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?) RETURNING id",
                    (
                        kind,
                        place.house_id,
                        category,
                        text,
                        photo.data if photo else None,
                        photo.mime if photo else None,
                        now,
                        now,
                    ),
                ).fetchone()[0]
            )
            data: dict[str, Any] = {"work_item": wid, "kind": kind}
            if category:
                data["category"] = category
            if photo:
                data["photo"] = True
            if token:
                data["token"] = _hash(token)
            row = self._event_row(c, place, "house.problem", int(wire.Priority.FAULT), data)
            c.execute("UPDATE work_items SET event_id = ? WHERE id = ?", (row[0], wid))
            return event_dict(row), wid

        ev, wid = await self.write(op)
        self.svc.hub.broadcast({"kind": "event", "event": ev})
        log.warning("house.problem from %s (work item %d)", place.short_zh, wid)
        return wid

    async def sos_state(
        self, place: reg.Place, event_id: str | None, token: str | None, person_id: int | None
    ) -> dict[str, Any] | None:
        """The state of a help call from this house: the one this phone raised (its event id and token), or, for
        a signed-in resident of the house, the newest in the last day. None when there is none to show."""
        site, b, u, h = place.site, place.building, place.unit, place.house
        since = datetime.fromtimestamp(self.wall() - 86400, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        def load(c: Conn) -> dict[str, Any] | None:
            ev = None
            if event_id and token:
                ev = c.execute(
                    "SELECT id, ts, data FROM events WHERE id = ? AND type = 'house.sos'", (event_id,)
                ).fetchone()
                if ev is None or not secrets.compare_digest(str(json.loads(ev["data"]).get("token", "")), _hash(token)):
                    ev = None
            if ev is None and person_id is not None:
                ev = c.execute(
                    "SELECT id, ts FROM events WHERE type = 'house.sos' AND site = ?"
                    f" AND {db.json_field(c, 'place', 'building')} = ?"
                    f" AND {db.json_field(c, 'place', 'unit')} = ?"
                    f" AND {db.json_field(c, 'place', 'house')} = ? AND ts >= ? ORDER BY id DESC LIMIT 1",
                    (site, b, u, h, since),
                ).fetchone()
            if ev is None:
                return None
            inc = c.execute(
                "SELECT i.state, i.acknowledged_at, i.dispatched_at, i.on_scene_at, i.resolved_at,"
                " i.closed_at, g.number AS grid_number, g.status AS grid_status, g.status_at AS grid_at,"
                " g.status_by AS grid_by FROM incident_keys k JOIN incidents i ON i.id = k.incident_id"
                " LEFT JOIN grid_cases g ON g.incident_id = i.id WHERE k.key = ?",
                (f"ev:{ev['id']}",),
            ).fetchone()
            none = dict.fromkeys(
                (
                    "acknowledged_at",
                    "dispatched_at",
                    "on_scene_at",
                    "resolved_at",
                    "closed_at",
                    "grid_number",
                    "grid_status",
                    "grid_at",
                    "grid_by",
                )
            )
            return {"event": ev["id"], "ts": ev["ts"], **(dict(inc) if inc else {**none, "state": "sent"})}

        return await self.read(load)

    async def report_states(
        self, place: reg.Place, work_id: int | None, token: str | None, person_id: int | None
    ) -> list[dict[str, Any]]:
        """Problem reports of this house to show on a phone: the one this phone made (its work item id and token),
        and, for a signed-in resident of the house, the house's reports of the last 30 days. Each with its steps
        (status and time, not the guards' notes) and where the grid platform has it."""
        hid = place.house_id
        since = datetime.fromtimestamp(self.wall() - 30 * 86400, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        def load(c: Conn) -> list[dict[str, Any]]:
            ids: list[int] = []
            if work_id is not None and token:
                row = c.execute(
                    "SELECT w.id, e.data FROM work_items w JOIN events e ON e.id = w.event_id"
                    " WHERE w.id = ? AND w.house_id = ?",
                    (work_id, hid),
                ).fetchone()
                if row is not None and secrets.compare_digest(
                    str(json.loads(row["data"]).get("token", "")), _hash(token)
                ):
                    ids.append(int(row["id"]))
            if person_id is not None:
                ids += [
                    int(r[0])
                    for r in c.execute(
                        "SELECT id FROM work_items WHERE house_id = ? AND kind = 'problem' AND created_at >= ?"
                        " ORDER BY id DESC LIMIT 10",
                        (hid, since),
                    )
                    if int(r[0]) not in ids
                ]
            out = []
            for wid in ids:
                r = c.execute(
                    "SELECT w.id, w.category, w.status, w.notes, w.created_at, g.number AS grid_number,"
                    " g.status AS grid_status, g.status_at AS grid_at, g.status_by AS grid_by"
                    " FROM work_items w LEFT JOIN grid_cases g ON g.work_item_id = w.id WHERE w.id = ?",
                    (wid,),
                ).fetchone()
                d = dict(r)
                d["steps"] = [
                    {"status": n.get("status"), "at": n.get("at")}
                    for n in json.loads(r["notes"] or "[]")
                    if isinstance(n, dict)
                ]
                out.append(d)
            return out

        return await self.read(load)

    # -- doors

    async def unlock(self, door: reg.Door, by: str) -> tuple[str, str | None]:
        """(``opened``, None); (``failed``, why: one of :data:`gateway.wire.UNLOCK_FAILURES`, ``unsent`` when the
        command could not be sent, None when the gateway gave no reason); or (``unanswered``, None): no answer within
        ``phone.unlock_wait_s``. The command expires then, as the console's do, so a gateway that gets it later (its
        link down, the broker holding it) does not open the door behind a resident who has been told otherwise."""
        now = datetime.now(UTC)
        wait_s = self.cfg.phone.unlock_wait_s
        cmd = wire.Command(
            v=wire.COMMAND_VERSION,
            id=str(ULID()),
            type="unlock",
            ts=now,
            expires=now + timedelta(seconds=wait_s),
            by=by,
            args={"door": door.door, "reason": "resident phone"},
        )
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiters[cmd.id] = fut
        try:
            try:
                await self.svc.ingest.send_command(door.site, door.gateway, cmd)
            except (BrokerUnavailable, ValueError, wire.WireError) as e:
                log.info("unlock of %s not sent: %s", door.door, e)
                return "failed", "unsent"
            try:
                async with asyncio.timeout(wait_s):
                    data = await fut
            except TimeoutError:
                return "unanswered", None
            if data.get("ok") is True:
                return "opened", None
            why = data.get("reason")
            return "failed", why if why in wire.UNLOCK_FAILURES else None
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
            elif (
                isinstance(res, StatusResult)
                and isinstance(op, SetStatus)
                and res.changed
                and res.snapshot.status == "online"
                and self.publisher is not None
            ):
                pub = self.publisher
                self.spawn(
                    pub.refresh(op.site, force_gateway=(op.site, op.gateway)),
                    f"portal.revocations[{op.site}/{op.gateway}]",
                )

    async def run_timer(self) -> None:
        every = self.cfg.phone.revocations_every_s
        while True:
            try:
                await self.refresh_revocations()
            except Exception:
                log.exception("revocation refresh failed")
            await asyncio.sleep(every)


ESTATE = web.AppKey("portal.estate", Estate)


def setup(
    app: web.Application, *, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic
) -> None:
    """The estate's start/stop; its routes are added by :func:`portal.estate.setup`."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        svc = app[SERVICES]
        est = Estate(svc=svc, issuer=PassIssuer(svc.signing_key, now=wall), wall=wall, mono=mono)
        est.publisher = Publisher([(g.site, g.gateway) for g in svc.cfg.gateways], est.rebuild, svc.ingest.send_command)
        svc.store.add_commit_listener(est.on_commit)
        app[ESTATE] = est
        timer = asyncio.create_task(est.run_timer(), name="portal.revocations")
        est.spawn(
            photos.run_cleaning(est.read, est.write, est.cpu, svc.cfg.phone.photo_max_pixels), "portal.photos.clean"
        )  # photos stored before they were re-encoded without metadata
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
