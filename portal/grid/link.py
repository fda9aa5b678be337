"""The running grid link: delivery of the outbox, the lasting-fault timer, and polling for status.

Delivery (docs/grid.md, "Delivery"): every record is POSTed to ``<url>/events``, signed (HMAC-SHA256 over the
timestamp, method, path and body), over HTTPS with the platform's CA and, optionally, the portal's client
certificate (mutual TLS). A case's report goes first; after it only the newest revision still waiting is sent
(older ones are superseded: each revision carries the whole handling so far). The platform answers 2xx with the
number and revision it took (a revision it already has is taken again, ``duplicate``). Timeouts, refused
connections, 5xx, 408, 425 and 429 mean the platform is away: one backoff for the whole link (capped, jittered,
reset by the next success), probing with one record at a time until it answers: the record tried least often
first, so one the platform cannot take (a 500 for that record alone, an answer it cannot give) does not keep the
others behind it. 401 and 403 mean it refuses our key: the link waits the same way and says so. Any other 4xx
refuses the record itself: it becomes a failure with the platform's reason, shown to administrators (the case's
later revisions wait behind it) until one sends it again. An answer (to a record, or to a poll) is read whole, in
however many pieces it comes, up to a size cap; a longer one is an error said in words, never cut and misread.
Nothing is deleted: a record is pending in the store until the platform has taken it, so a portal restart or an
outage of hours loses nothing (the in-memory backoff starts afresh after a restart).

Timers run on the monotonic clock (``Options.monotonic``); request timestamps carry the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from common.configfile import ConfigError, read_secret
from portal.alarms import incidents as alarms
from portal.grid import cases, contract
from portal.store import Conn, Row, audit, now_text
from portal.web.answers import read_answer
from portal.web.services import Services

log = logging.getLogger("portal.grid")
CONCURRENCY = 4
HEADS_MAX = 50
#: The longest answer read: to a record (a few hundred bytes in the contract), and to a poll (a history of up to
#: 100 statuses, each with a note of up to 2,000 characters).
ANSWER_MAX = 64 * 1024
HISTORY_MAX = 1024 * 1024
TRANSIENT = frozenset({408, 425, 429})
REFUSED_KEY = frozenset({401, 403})


class LinkBroken(Exception):
    """The link cannot send at all (an unreadable key or certificate)."""


def load_secrets(g: Any) -> tuple[bytes, ssl.SSLContext | None]:
    """The HMAC key and the TLS context of the grid config ``g``. Raises :class:`ConfigError` (a file missing,
    readable by others, or not a certificate); ``python -m portal check`` calls it too."""
    key = read_secret(str(g.key_file)).encode()
    if len(key) < 16:
        raise ConfigError([f"{g.key_file}: the HMAC key must have at least 16 characters"])
    if not g.url.startswith("https://"):
        return key, None
    try:
        ctx = ssl.create_default_context(cafile=g.ca_file) if g.ca_file else ssl.create_default_context()
        if g.client_cert_file:
            st = os.stat(g.client_key_file)
            if st.st_mode & 0o077:
                raise ConfigError(
                    [f"{g.client_key_file}: secret file must not be readable by group or others (chmod 600)"]
                )
            ctx.load_cert_chain(g.client_cert_file, g.client_key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError([f"grid TLS: {e}"]) from None
    return key, ctx


@dataclass(frozen=True)
class Outcome:
    kind: str  # sent | rejected | retry | refused
    detail: str = ""
    answer: contract.Answer | None = None
    retry_after_s: float | None = None


def _reason(status: int, raw: bytes) -> str:
    """The platform's own words for a refusal, short and printable."""
    text = ""
    try:
        body = json.loads(raw)
        if isinstance(body, dict):
            text = " · ".join(str(body[k]) for k in ("error", "detail", "message", "reason") if body.get(k))
    except ValueError:
        text = raw.decode("utf-8", "replace")
    text = "".join(c for c in " ".join(text.split()) if c.isprintable())
    return f"HTTP {status}" + (f": {text[:280]}" if text else "")


class GridLink:
    """Sends the outbox, watches lasting faults, polls when configured; ``changed(incident)`` after each change
    of an incident's grid state (so the consoles show it)."""

    def __init__(
        self,
        svc: Services,
        link: cases.Link,
        changed: Callable[[dict[str, Any]], None],
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.svc = svc
        self.link = link
        self.g = link.grid
        self.changed = changed
        self.wall, self.mono, self.rand = wall, mono, rand
        self.broken = ""  # why nothing can be sent (shown to administrators)
        self.refused = ""  # the platform refuses our key (401/403): the last answer
        self.last_error = ""
        self.last_ok_at: str | None = None
        self.fails = 0  # consecutive failures of the link (not of one record)
        self.resume_at = 0.0  # monotonic: no sending before this
        self.sent = 0
        self._key = b""
        self._ssl: ssl.SSLContext | None = None
        self._http: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lasting: dict[int, float] = {}  # incident id → monotonic time it goes up
        self._last_poll = -1e18
        parts = urllib.parse.urlsplit(self.g.url)
        self.events_url = self.g.url.rstrip("/") + "/events"
        self.events_path = parts.path.rstrip("/") + "/events"

    # -- lifecycle

    async def start(self) -> None:
        try:
            self._key, self._ssl = await asyncio.to_thread(load_secrets, self.g)
        except ConfigError as e:
            self.broken = "; ".join(e.problems)
            log.error("grid link cannot send: %s (records wait in the outbox)", self.broken)
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl else True))
        self._tasks = [
            asyncio.create_task(self._deliver_loop(), name="portal.grid.deliver"),
            asyncio.create_task(self._timer_loop(), name="portal.grid.timer"),
        ]
        self._wake.set()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._http is not None:
            await self._http.close()
            self._http = None

    def kick(self) -> None:
        """Something was queued: send now (unless the link is backing off)."""
        self._wake.set()

    def health(self) -> dict[str, Any]:
        return {
            "broken": self.broken,
            "refused": self.refused,
            "last_error": self.last_error,
            "fails": self.fails,
            "waiting_s": max(0.0, round(self.resume_at - self.mono(), 1)),
            "last_ok_at": self.last_ok_at,
            "sent": self.sent,
        }

    # -- delivery

    async def _deliver_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.g.tick_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if await self.deliver_once():
                    self._wake.set()  # more may be waiting
            except Exception:
                log.exception("grid delivery failed; retrying")

    async def deliver_once(self) -> int:
        """Send what is due now; returns how many records the platform took (tests call it to step)."""
        if self.broken or self.mono() < self.resume_at:
            return 0
        heads = await self.svc.store.read(_heads)
        if not heads:
            return 0
        if self.fails:
            heads = heads[:1]  # the platform was away: one record probes (the one tried least often: _heads)
        took = 0
        for i in range(0, len(heads), CONCURRENCY):
            chunk = heads[i : i + CONCURRENCY]
            outcomes = await asyncio.gather(*(self._send(r) for r in chunk))
            link_down = None
            for row, out in zip(chunk, outcomes, strict=True):
                inc = await self.svc.store.run_write(functools.partial(_record, row=row, out=out))
                if inc is not None:
                    self.changed(inc)
                if out.kind == "sent":
                    took += 1
                elif out.kind in ("retry", "refused"):
                    link_down = out
            if link_down is not None:
                self._backoff(link_down)
                break
            self.fails, self.refused, self.last_error = 0, "", ""
            self.last_ok_at = now_text()
        self.sent += took
        return took

    def _backoff(self, out: Outcome) -> None:
        self.fails += 1
        cap = min(self.g.retry_max_s, self.g.retry_first_s * 2 ** min(self.fails - 1, 30))
        delay = cap / 2 + self.rand() * cap / 2
        if out.retry_after_s is not None:
            delay = max(delay, min(out.retry_after_s, self.g.retry_max_s))
        self.resume_at = self.mono() + delay
        self.last_error = out.detail
        if out.kind == "refused":
            self.refused = out.detail
        log.warning("grid platform: %s; trying again in %.0f s (failure %d)", out.detail, delay, self.fails)

    async def _send(self, row: Row) -> Outcome:
        assert self._http is not None
        body = str(row["body"]).encode()
        headers = contract.headers(self._key, self.g.key_id, int(self.wall()), "POST", self.events_path, body)
        headers.update({"Content-Type": "application/json", "Idempotency-Key": f"{row['number']}:{row['revision']}"})
        try:
            async with self._http.post(
                self.events_url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=self.g.timeout_s)
            ) as r:
                whole = await read_answer(r, ANSWER_MAX)
                status = r.status
                retry_after = r.headers.get("Retry-After", "")
        except TimeoutError:
            return Outcome("retry", f"no answer within {self.g.timeout_s:g} s")
        except aiohttp.ClientError as e:
            return Outcome("retry", f"{type(e).__name__}: {str(e)[:200]}")
        wait_s = float(retry_after) if retry_after.isdigit() else None
        raw = whole or b""  # a refusal's words are only shown: a refusal too long to read is still a refusal
        if 200 <= status < 300:
            if whole is None:
                return Outcome("retry", f"HTTP {status} with an answer over {ANSWER_MAX} bytes")
            try:
                answer = contract.decode_answer(raw)
            except contract.ContractError as e:
                return Outcome("retry", f"HTTP {status} with an answer not in the contract: {e}"[:300])
            if (answer.number, answer.revision) != (row["number"], row["revision"]):
                return Outcome("retry", f"the platform answered for {answer.number} revision {answer.revision}")
            return Outcome("sent", answer=answer)
        if status in REFUSED_KEY:
            return Outcome("refused", _reason(status, raw) + " (is grid.key_file the platform's key?)")
        if status in TRANSIENT or status >= 500:
            return Outcome("retry", _reason(status, raw), retry_after_s=wait_s)
        return Outcome("rejected", _reason(status, raw))

    # -- the lasting-fault timer and polling

    async def _timer_loop(self) -> None:
        while True:
            await asyncio.sleep(self.g.tick_s)
            try:
                await self.check_lasting()
                if self.g.poll_every_s and self.mono() - self._last_poll >= self.g.poll_every_s:
                    self._last_poll = self.mono()
                    await self.poll_once()
            except Exception:
                log.exception("grid timer failed")

    async def check_lasting(self) -> list[int]:
        """Put open, unrestored incidents that have lasted past a lasting rule's ``after_s`` on their way up
        (monotonic clock, from when this process first saw them, less their age then); returns the case ids."""
        if not any(r.on == "lasting" for r in self.g.rules):
            return []
        rows = await self.svc.store.read(
            lambda c: [
                alarms.incident_dict(r)
                for r in c.execute(
                    "SELECT * FROM incidents WHERE state != 'closed' AND restored_at IS NULL AND NOT EXISTS"
                    " (SELECT 1 FROM grid_cases g WHERE g.incident_id = incidents.id) ORDER BY id LIMIT 1000"
                )
            ]
        )
        now_mono, now_wall = self.mono(), self.wall()
        alive = set()
        due = []
        for inc in rows:
            after = self.link.lasting_due(inc)
            if after is None:
                continue
            alive.add(inc["id"])
            if inc["id"] not in self._lasting:
                age = max(0.0, now_wall - alarms.parse_ts(inc["created_at"]).timestamp())
                self._lasting[inc["id"]] = now_mono - age + after
            if now_mono >= self._lasting[inc["id"]]:
                due.append(inc["id"])
        for iid in list(self._lasting):
            if iid not in alive:
                del self._lasting[iid]
        opened = []
        for iid in due:
            cid = await self.svc.store.run_write(functools.partial(_open_lasting, link=self.link, incident_id=iid))
            self._lasting.pop(iid, None)
            if cid is not None:
                opened.append(cid)
                fresh = await self.svc.store.read(functools.partial(alarms.get_incident, incident_id=iid))
                if fresh is not None:
                    self.changed(fresh)
        if opened:
            self.kick()
        return opened

    async def poll_once(self) -> int:
        """Ask the platform for the status of every case it took that is not finished; returns how many statuses
        were new."""
        if self.broken or self._http is None:
            return 0
        numbers = await self.svc.store.read(
            lambda c: [
                r[0]
                for r in c.execute(
                    "SELECT number FROM grid_cases WHERE reported_at IS NOT NULL AND (status IS NULL OR status NOT IN"
                    " ('closed', 'returned')) ORDER BY id LIMIT 200"
                )
            ]
        )
        new = 0
        for number in numbers:
            path = f"{self.events_path}/{number}"
            headers = contract.headers(self._key, self.g.key_id, int(self.wall()), "GET", path, b"")
            try:
                async with self._http.get(
                    f"{self.events_url}/{number}",
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.g.timeout_s),
                ) as r:
                    whole = await read_answer(r, HISTORY_MAX)
                    status = r.status
            except (TimeoutError, aiohttp.ClientError) as e:
                log.info("grid poll of %s: %s", number, type(e).__name__)
                return new
            if status != 200:
                log.info("grid poll of %s: %s", number, _reason(status, whole or b""))
                continue
            if whole is None:
                log.warning("grid poll of %s: an answer over %d bytes", number, HISTORY_MAX)
                continue
            try:
                hist = contract.decode_history(whole)
            except contract.ContractError as e:
                log.warning("grid poll of %s: an answer not in the contract: %s", number, e)
                continue
            for st in hist.history:
                if st.number != number:
                    continue
                got = await self.svc.store.run_write(
                    functools.partial(cases.apply_status, st=st, source="poll", actor=f"grid:{self.g.key_id}")
                )
                if got is not None and got.new:
                    new += 1
                    if got.incident is not None:
                        self.changed(got.incident)
        return new


def _heads(conn: Conn) -> list[Row]:
    """Per case, the record to send next: its report, else its newest waiting revision; none for a case whose
    earlier record the platform refused (it waits for an administrator). The records tried least often come first,
    so while the link is failing the record that probes is each in turn, not always the oldest."""
    return conn.execute(
        "SELECT o.*, c.number FROM grid_outbox o JOIN grid_cases c ON c.id = o.case_id WHERE o.state = 'pending'"
        " AND o.id = (SELECT o2.id FROM grid_outbox o2 WHERE o2.case_id = o.case_id AND o2.state = 'pending'"
        "  ORDER BY o2.kind = 'report' DESC, o2.revision DESC LIMIT 1)"
        " AND NOT EXISTS (SELECT 1 FROM grid_outbox f WHERE f.case_id = o.case_id AND f.state = 'failed')"
        " ORDER BY o.attempts, o.id LIMIT ?",
        (HEADS_MAX,),
    ).fetchall()


def _record(conn: Conn, row: Row, out: Outcome) -> dict[str, Any] | None:
    """Write what came of one attempt; the incident after it when its grid state changed."""
    now = now_text()
    cur = conn.execute("SELECT state FROM grid_outbox WHERE id = ?", (row["id"],)).fetchone()
    if cur is None or cur["state"] != "pending":
        return None
    case = conn.execute("SELECT * FROM grid_cases WHERE id = ?", (row["case_id"],)).fetchone()
    iid = case["incident_id"]
    if out.kind == "sent":
        assert out.answer is not None
        conn.execute(
            "UPDATE grid_outbox SET state = 'sent', sent_at = ?, attempts = attempts + 1, last_error = '' WHERE id = ?",
            (now, row["id"]),
        )
        conn.execute(
            "UPDATE grid_outbox SET state = 'superseded' WHERE case_id = ? AND state = 'pending'"
            " AND kind = 'update' AND revision < ?",
            (row["case_id"], row["revision"]),
        )
        conn.execute(
            "UPDATE grid_cases SET sent_revision = greatest(sent_revision, ?), reported_at = coalesce("
            "reported_at, ?), platform_case = CASE WHEN platform_case = '' THEN ? ELSE platform_case END"
            " WHERE id = ?",
            (row["revision"], now, out.answer.case_id[:200], row["case_id"]),
        )
        if row["kind"] == "report" and iid is not None:
            cases._incident_log(conn, iid, now, "system", "grid", f"网格平台已接收 {case['number']}")
            return alarms.get_incident(conn, iid)
        return None
    if out.kind == "rejected":
        conn.execute(
            "UPDATE grid_outbox SET state = 'failed', attempts = attempts + 1, last_error = ? WHERE id = ?",
            (out.detail[:300], row["id"]),
        )
        audit.write(
            conn,
            "system",
            "grid.refused",
            f"grid:{case['number']}",
            f"revision {row['revision']} · {out.detail}"[:500],
            at=now,
        )
        if iid is not None:
            cases._incident_log(conn, iid, now, "system", "grid", f"网格平台拒收：{out.detail}")
            return alarms.get_incident(conn, iid)
        return None
    conn.execute(
        "UPDATE grid_outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?", (out.detail[:300], row["id"])
    )
    return None


def _open_lasting(conn: Conn, link: cases.Link, incident_id: int) -> int | None:
    inc = alarms.get_incident(conn, incident_id)
    if inc is None or inc["state"] == "closed" or inc["restored_at"] or link.lasting_due(inc) is None:
        return None
    if conn.execute("SELECT 1 FROM grid_cases WHERE incident_id = ?", (incident_id,)).fetchone():
        return None
    return cases.open_case(conn, link, incident_id=incident_id, trigger="lasting", by="system")
