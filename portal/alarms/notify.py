"""Escalations to people outside the guardroom: WeCom (企业微信) and DingTalk group robots, SMS through an HTTP
gateway, and e-mail. Each configured channel (``notify.channels``) is one way of reaching people.

When an incident escalates (unacknowledged past ``alarms.escalate_after_s``, or ``priority_escalate_after_s`` for
priority alarms) :meth:`Notifier.escalated` writes one delivery row per channel that takes the incident's
priority (``notifications``), and a task per delivery sends it: each attempt bounded by ``notify.timeout_s``,
failures retried with doubling waits (``retry_first_s`` .. ``retry_max_s``, with jitter) up to ``attempts``.
Only an answer that says it was delivered counts: HTTP 2xx and, for the robots, ``errcode`` 0; for SMS, 2xx and
no non-zero ``errcode``/``code``; for e-mail, the SMTP server accepting every recipient. Every outcome is written
to the delivery row and the incident's log, and pushed to the consoles, so the board says what was actually
delivered and when. Deliveries still pending when the portal stops are taken up again at the next start.

Several instances sharing the store (PostgreSQL, docs/centre.md) send each attempt once: an instance claims the
delivery's row before each attempt (``owner``, ``lease_until``: one write that succeeds for one instance only), for
``notify.timeout_s`` and :data:`LEASE_MARGIN_S`; between attempts the lease runs until the next is due. Every
instance looks every :data:`SWEEP_S` for pending deliveries whose lease ran out (their instance stopped) and takes
them up, so a notice outlives the instance that began it. Leases are on the wall clock, as the store's shared
limits are: the instances' clocks must agree (NTP) to well within the margin. One instance on SQLite takes up every
pending delivery at its start, as it always did.

Formats (as the services document them):

* WeCom group robot: ``POST <webhook URL with key>`` ``{"msgtype": "text", "text": {"content": ...,
  "mentioned_mobile_list": [...]}}``, answer ``{"errcode": 0, "errmsg": "ok"}``.
* DingTalk custom robot: ``POST <webhook URL with access_token>`` ``{"msgtype": "text", "text": {"content": ...},
  "at": {"atMobiles": [...], "isAtAll": false}}``; with a signing secret (加签) the URL gains ``timestamp``
  (ms) and ``sign`` = URL-encoded base64 of HMAC-SHA256(secret, "<timestamp>\\n<secret>").
* SMS gateway: ``POST <url>`` ``{"to": [...], "text": ...}`` with ``Authorization: Bearer <token>`` when a
  token file is set.
* E-mail: SMTP (plain, STARTTLS or implicit TLS, optional login) with :mod:`smtplib` on a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import random
import secrets
import smtplib
import ssl
import time
import urllib.parse
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp

from common.configfile import ConfigError, read_secret
from portal.alarms import incidents as alarms
from portal.config import ChannelConfig, PortalConfig
from portal.store import Conn, Store, StoreError, audit, now_text
from portal.web import i18n
from portal.web.answers import read_answer

log = logging.getLogger("portal.notify")
ANSWER_MAX = 65536  # a webhook's answer is a short JSON object: one longer is no answer
TEXT_MAX = 1500  # WeCom's text limit is 2048 bytes; Chinese text is 3 bytes a character
#: an attempt's lease is notify.timeout_s and this: time to record its outcome (an e-mail's SMTP steps are bounded
#: one by one, so a very slow server may outlast it, and another instance then tries again)
LEASE_MARGIN_S = 10.0
SWEEP_S = 5.0  # how often each instance of a shared store looks for deliveries nobody holds


class DeliveryError(Exception):
    """One attempt did not deliver; the text says why (kept on the delivery row, never a secret)."""


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk's robot signature: base64(HMAC-SHA256(key=secret, "<timestamp>\\n<secret>")), URL-encoded."""
    mac = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return urllib.parse.quote_plus(base64.b64encode(mac).decode())


def _redact(url: str) -> str:
    """A URL fit for a log: no query (robots' keys and tokens live there), no credentials."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


class Channel:
    def __init__(self, cfg: ChannelConfig, timeout_s: float) -> None:
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.broken = ""  # why it cannot send at all (an unreadable secret): every attempt fails with it
        self.url = self.secret = self.token = self.password = ""
        try:
            if cfg.url_file:
                self.url = read_secret(cfg.url_file)
                if not self.url.startswith(("http://", "https://")):
                    self.broken = f"{cfg.url_file}: not an http(s) URL"
            if cfg.secret_file:
                self.secret = read_secret(cfg.secret_file)
            if cfg.token_file:
                self.token = read_secret(cfg.token_file)
            if cfg.smtp_password_file:
                self.password = read_secret(cfg.smtp_password_file)
        except ConfigError as e:
            self.broken = "; ".join(e.problems)
        if self.broken:
            log.error("notification channel %s cannot send: %s", cfg.name, self.broken)

    async def send(self, http: aiohttp.ClientSession, subject: str, text: str) -> None:
        if self.broken:
            raise DeliveryError(self.broken)
        kind = self.cfg.kind
        if kind == "email":
            await asyncio.to_thread(self._mail, subject, text)
            return
        url, headers = self.url, {"Content-Type": "application/json"}
        if kind == "wecom":
            body: dict[str, Any] = {
                "msgtype": "text",
                "text": {"content": text[:TEXT_MAX], "mentioned_mobile_list": list(self.cfg.mentions)},
            }
        elif kind == "dingtalk":
            body = {
                "msgtype": "text",
                "text": {"content": text[:TEXT_MAX]},
                "at": {"atMobiles": list(self.cfg.mentions), "isAtAll": False},
            }
            if self.secret:
                ts = int(time.time() * 1000)
                url += ("&" if "?" in url else "?") + f"timestamp={ts}&sign={dingtalk_sign(self.secret, ts)}"
        else:  # sms
            body = {"to": list(self.cfg.to), "text": text[:500]}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
        try:
            async with http.post(
                url,
                data=json.dumps(body, ensure_ascii=False).encode(),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as r:
                raw = await read_answer(r, ANSWER_MAX)
                status = r.status
        except TimeoutError:
            raise DeliveryError(f"no answer within {self.timeout_s:g} s from {_redact(url)}") from None
        except aiohttp.ClientError as e:
            raise DeliveryError(f"{type(e).__name__} at {_redact(url)}") from None
        if not 200 <= status < 300:
            raise DeliveryError(f"HTTP {status} from {_redact(url)}")
        if raw is None:
            raise DeliveryError(f"an answer longer than {ANSWER_MAX} bytes from {_redact(url)}")
        try:
            answer = json.loads(raw) if raw.strip() else {}
        except ValueError:
            if kind == "sms":
                return  # a gateway that answers 2xx with plain text has taken it
            raise DeliveryError(f"an answer that is not JSON from {_redact(url)}") from None
        code = answer.get("errcode", answer.get("code", 0)) if isinstance(answer, dict) else None
        if kind in ("wecom", "dingtalk") and (not isinstance(answer, dict) or "errcode" not in answer):
            raise DeliveryError(f"no errcode in the answer from {_redact(url)}")
        if code not in (0, "0", None):
            msg = str(answer.get("errmsg") or answer.get("message") or "")[:120] if isinstance(answer, dict) else ""
            raise DeliveryError(f"errcode {code}: {msg}".strip())

    def _mail(self, subject: str, text: str) -> None:
        c = self.cfg
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = c.sender, ", ".join(c.to), subject
        msg["Message-ID"] = make_msgid(domain=c.sender.rsplit("@", 1)[-1])
        msg.set_content(text)
        try:
            ctx = ssl.create_default_context()
            smtp_cls = smtplib.SMTP_SSL if c.smtp_security == "ssl" else smtplib.SMTP
            kw: dict[str, Any] = {"context": ctx} if c.smtp_security == "ssl" else {}
            with smtp_cls(c.smtp_host, c.smtp_port, timeout=self.timeout_s, **kw) as s:
                if c.smtp_security == "starttls":
                    s.starttls(context=ctx)
                if c.smtp_user:
                    s.login(c.smtp_user, self.password)
                refused = s.send_message(msg)
        except (OSError, smtplib.SMTPException) as e:
            raise DeliveryError(f"SMTP {c.smtp_host}:{c.smtp_port}: {type(e).__name__}: {str(e)[:120]}") from None
        if refused:
            raise DeliveryError(f"refused recipients: {', '.join(sorted(refused))}")


class Notifier:
    """Creates the deliveries of escalated incidents and runs them; ``changed(incident)`` after each outcome."""

    def __init__(
        self,
        cfg: PortalConfig,
        store: Store,
        changed: Callable[[dict[str, Any]], None],
        *,
        rand: Callable[[], float] = random.random,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.ncfg = cfg.notify
        self.store = store
        self.changed = changed
        self.rand = rand
        self.wall = wall
        self.me = secrets.token_hex(6)  # this instance, as the owner of the deliveries it is sending
        self.channels = {c.name: Channel(c, cfg.notify.timeout_s) for c in cfg.notify.channels}
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: set[int] = set()  # the deliveries this instance has a task for
        self._sweeper: asyncio.Task[None] | None = None
        self._tr = i18n.Translator(cfg.language)
        self._tz = ZoneInfo(cfg.timezone)

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        await self.sweep()
        if self.store.shared:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="portal.notify.sweep")

    async def sweep(self) -> None:
        """Take up the pending deliveries nobody holds: on a store of one's own all of them (at the start), on a
        shared store those whose lease ran out."""
        shared, now = self.store.shared, self.wall()

        def get(c: Conn) -> list[int]:
            sql = "SELECT id FROM notifications WHERE state = 'pending'"
            if shared:
                sql += " AND (lease_until IS NULL OR lease_until < ?)"
            return [int(r[0]) for r in c.execute(sql + " ORDER BY id", (now,) if shared else ())]

        for nid in await self.store.read(get):
            self._spawn(nid)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                await self.sweep()
            except StoreError as e:
                log.warning("notification sweep: %s", e)
            except Exception:
                log.exception("notification sweep failed")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sweeper
            self._sweeper = None
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _spawn(self, nid: int) -> None:
        if nid in self._active:
            return
        self._active.add(nid)
        t = asyncio.create_task(self._deliver(nid), name=f"portal.notify[{nid}]")
        self._tasks.add(t)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._active.discard(nid)

        t.add_done_callback(done)

    def _lease(self) -> float:
        """Until when an attempt starting now holds its delivery."""
        return self.wall() + self.ncfg.timeout_s + LEASE_MARGIN_S

    # -- what to send

    def text(self, inc: dict[str, Any]) -> tuple[str, str]:
        tr, lang = self._tr, self._tr.lang
        title = inc["title"].get(lang) or inc["type"]
        where = inc["where"].get(lang) or ""
        when = alarms.parse_ts(inc["opened_at"]).astimezone(self._tz).strftime("%Y-%m-%d %H:%M:%S")
        kw = {
            "site": self.cfg.site_name,
            "title": title,
            "where": where,
            "when": when,
            "id": inc["id"],
            "tz": self.cfg.timezone,
            "state": tr(f"state.{inc['state']}"),
            "n": inc.get("trips", 1),
        }
        return tr("notify.subject", **kw), tr("notify.text", **kw)

    async def escalated(self, incs: list[dict[str, Any]]) -> int:
        """Record a delivery per channel for each newly escalated incident and start sending; how many."""
        rows: list[tuple[int, str, str, str]] = []
        for inc in incs:
            for ch in self.ncfg.channels:
                if inc["priority"] >= ch.min_priority:
                    rows.append((inc["id"], ch.name, ch.shown, ch.kind))
        if not rows:
            return 0

        lease = self._lease()

        def put(c: Conn) -> list[int]:
            now = now_text()
            ids = []
            for iid, name, label, kind in rows:
                row = c.execute(
                    "INSERT INTO notifications (incident_id, channel, label, kind, state, created_at, updated_at,"
                    " owner, lease_until) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)"
                    " ON CONFLICT DO NOTHING RETURNING id",
                    (iid, name, label, kind, now, now, self.me, lease),
                ).fetchone()
                if row is not None:
                    ids.append(int(row[0]))
            return ids

        ids = await self.store.run_write(put)
        for iid in {r[0] for r in rows}:
            fresh = await self.store.read(functools.partial(alarms.get_incident, incident_id=iid))
            if fresh is not None:
                self.changed(fresh)
        for nid in ids:
            self._spawn(nid)
        return len(ids)

    async def test(self, channel: str, by: str) -> int:
        """A test message on one channel (the supervisor's check of the set-up); the delivery's id."""
        ch = self.channels[channel].cfg
        lease = self._lease()

        def put(c: Conn) -> int:
            now = now_text()
            cur = c.execute(
                "INSERT INTO notifications (incident_id, channel, label, kind, state, created_at, updated_at,"
                " owner, lease_until) VALUES (NULL, ?, ?, ?, 'pending', ?, ?, ?, ?) RETURNING id",
                (ch.name, ch.shown, ch.kind, now, now, self.me, lease),
            )
            nid = int(cur.fetchone()[0])
            audit.write(c, by, "notify.test", f"channel:{ch.name}")
            return nid

        nid: int = await self.store.run_write(put)
        self._spawn(nid)
        return nid

    # -- sending

    def _delay(self, attempt: int) -> float:
        d = min(self.ncfg.retry_first_s * 2 ** (attempt - 1), self.ncfg.retry_max_s)
        return d / 2 + self.rand() * d / 2

    async def _claim(self, nid: int) -> Any:
        """The delivery's row if it is pending and this instance now holds it for an attempt, else None. On a shared
        store only a lease run out or this instance's own is taken; a store of one's own has no one else."""
        lease, now = self._lease(), self.wall()
        held = " AND (lease_until IS NULL OR lease_until < ? OR owner = ?)" if self.store.shared else ""

        def put(c: Conn) -> Any:
            return c.execute(
                "UPDATE notifications SET owner = ?, lease_until = ? WHERE id = ? AND state = 'pending'"
                + held
                + " RETURNING *",
                (self.me, lease, nid, *((now, self.me) if held else ())),
            ).fetchone()

        return await self.store.run_write(put)

    async def _deliver(self, nid: int) -> None:
        words: tuple[str, str] | None = None
        while True:
            row = await self._claim(nid)
            if row is None:
                return  # delivered, failed, or another instance is sending it
            ch = self.channels.get(row["channel"])
            iid = row["incident_id"]
            if words is None:
                get = functools.partial(alarms.get_incident, incident_id=iid)
                inc = await self.store.read(get) if iid is not None else None
                test_text = self._tr("notify.test_text", site=self.cfg.site_name)
                words = self.text(inc) if inc is not None else (test_text, test_text)
            subject, text = words
            attempts = int(row["attempts"]) + 1
            try:
                if ch is None:
                    raise DeliveryError(f"channel {row['channel']} is no longer configured")
                assert self._http is not None
                await ch.send(self._http, subject, text)
            except DeliveryError as e:
                final = attempts >= self.ncfg.attempts or ch is None
                delay = self._delay(attempts)
                kept = await self._record(
                    nid, iid, row["channel"], attempts, "failed" if final else "pending", str(e), self.wall() + delay
                )
                log.warning("notification %d (%s) attempt %d failed: %s", nid, row["channel"], attempts, e)
                if final or not kept:
                    return
                await asyncio.sleep(delay)
                continue
            await self._record(nid, iid, row["channel"], attempts, "delivered", "", None)
            log.info("notification %d delivered through %s (attempt %d)", nid, row["channel"], attempts)
            return

    async def _record(
        self, nid: int, iid: int | None, channel: str, attempts: int, state: str, error: str, next_at: float | None
    ) -> bool:
        """An attempt's outcome; a pending one keeps the delivery this instance's until ``next_at`` (the retry).
        False if another instance took the delivery meanwhile (this attempt outlasted its lease): it is theirs, and
        only a delivery is recorded over them."""

        def put(c: Conn) -> tuple[bool, dict[str, Any] | None]:
            now = now_text()
            done = c.execute(
                "UPDATE notifications SET attempts = ?, state = ?, last_error = ?, updated_at = ?, lease_until = ?,"
                " delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END"
                " WHERE id = ? AND (owner = ? OR ? = 'delivered') RETURNING id",
                (attempts, state, error[:300], now, next_at, state, now, nid, self.me, state),
            ).fetchone()
            if done is None:
                return False, None
            if iid is None:
                return True, None
            if state != "pending" or attempts == 1:  # the first failure and the outcome go in the log
                detail = (
                    f"{channel}: {state}"
                    + (f" after {attempts} attempts" if attempts > 1 else "")
                    + (f" · {error}" if error else "")
                )
                c.execute(
                    "INSERT INTO incident_log (incident_id, at, actor, action, detail) VALUES"
                    " (?, ?, 'system', 'notify', ?)",
                    (iid, now, detail[:1000]),
                )
                c.execute("UPDATE incidents SET version = version + 1, updated_at = ? WHERE id = ?", (now, iid))
            return True, alarms.get_incident(c, iid)

        kept, inc = await self.store.run_write(put)
        if inc is not None:
            self.changed(inc)
        return kept


def recent(conn: Conn, limit: int = 200, sites: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """The newest deliveries with their incident's site and title (the supervisor's view)."""
    rows = conn.execute(
        "SELECT n.*, i.site, i.type, i.kind, i.place, i.data, i.priority FROM notifications n"
        " LEFT JOIN incidents i ON i.id = n.incident_id ORDER BY n.id DESC LIMIT ?",
        (limit,),
    )
    out = []
    for r in rows:
        d = dict(r)
        if sites is not None and d["site"] is not None and d["site"] not in sites:
            continue
        out.append(d)
    return out
