"""A stub of the district's grid-governance platform (网格化社会治理平台), the other side of docs/grid.md, written
from that document and not from the portal's code: it checks signatures and records with its own reading of the
contract, so a misreading on either side shows up as a disagreement.

Run::

    python -m firmware_stubs.grid_platform --key-file KEY [--key-id gatehouse] [--listen 127.0.0.1:0]
        [--control 127.0.0.1:0] [--callback http://127.0.0.1:8080/api/grid/callback]
        [--tls-cert CERT --tls-key KEY [--client-ca CA]] [--categories 01,04,05,06]
        [--auto --accept-after 5 --dispatch-after 20 --close-after 60] [--reject-every N]
        [--outage-every S --outage-for S]

When ready it prints one JSON line: ``{"ready": true, "url": "http://127.0.0.1:PORT/api/v1", "control":
"http://127.0.0.1:CPORT", "pid": 1234}``. SIGTERM or SIGINT stops it.

The platform (``url``): ``POST /events`` takes a record (signed; one it has under the same number and revision
is answered again as a duplicate and changes nothing), ``GET /events/<number>`` answers the case's status history.
Records with a category code it does not know are refused with 422 and the reason, like any field it does not
like. It calls the estate back (``--callback``) with each status, signed; a failed callback is tried again.

With ``--auto`` (the demo) it accepts, dispatches and closes each case after the delays given, refuses every N-th
record (``--reject-every``) and goes down now and then (``--outage-every``/``--outage-for``).

Control API (JSON over HTTP on loopback; tests and the demo):

========================================  ===================================================================
``GET  /state``                           records received (each number's revisions and its last record),
                                          duplicates, refusals, requests, callbacks sent with their answers
``POST /down``                            ``{"on": true, "how": "refuse" | "503" | "hang"}``: refuse
                                          connections, answer 503, or take the request and never answer
``POST /slow``                            ``{"s": 2.5}`` take each record at once, answer this late
``POST /fragment``                        ``{"bytes": 16, "pause_s": 0.05}``: write every answer (to a record,
                                          to a poll) in pieces of this many bytes, this far apart, after its
                                          headers (with Content-Length), as a slow WAN delivers it; 0 bytes:
                                          whole again
``POST /reject``                          ``{"count": 1, "status": 422, "reason": "..."}`` refuse the next
                                          ``count`` records
``POST /fail-case``                       ``{"status": 500}``: the next new case cannot be taken: each of its
                                          records, every time, is answered with this status (5xx); other
                                          cases are taken as usual. ``{"status": 0}``: no longer
``POST /callback-twice``                  ``{"on": true}`` send every callback twice (same callback id)
``POST /cases/{number}/status``           ``{"status": "accepted" | "dispatched" | "handling" | "closed" |
                                          "returned", "by": "...", "note": "..."}``: the case moves on and
                                          the estate is called back (the answer lists the callbacks' results)
``POST /callback-url``                    ``{"url": "..."}`` where callbacks go
========================================  ===================================================================
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import aiohttp
import msgspec
from aiohttp import web
from yarl import URL

from firmware_stubs.modbus_device import ControlError, _json_body, parse_hostport

BASE = "/api/v1"
WINDOW_S = 300
STATUS_NAMES = {
    "accepted": "已受理",
    "dispatched": "已派遣",
    "handling": "处置中",
    "closed": "已办结",
    "returned": "退回",
}


# ---------------------------------------------------------------- the contract, as docs/grid.md states it


class _S(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class CodeName(_S, kw_only=True):
    code: str
    name: str


class Location(_S, kw_only=True):
    address: str
    grid_code: str
    site: str
    building: str = ""
    unit: str = ""
    house: str = ""
    zone: str = ""
    lat: float | None = None
    lon: float | None = None
    crs: Literal["CGCS2000", "WGS84", "GCJ02"] | None = None


class Who(_S, kw_only=True):
    type: Literal["resident", "device", "guard"]
    name: str = ""
    org: str
    org_phone: str = ""


class File(_S, kw_only=True):
    name: str
    mime: Literal["image/jpeg", "image/png", "image/webp"]
    size: int
    sha256: str
    data: str


class EstateStep(_S, kw_only=True):
    stage: Literal["上报", "立案", "派遣", "处置", "核查", "结案"]
    action: str
    at: datetime
    by: str
    note: str = ""


class EstateHandling(_S, kw_only=True):
    state: str
    state_name: str
    closed: bool
    cause: str | None = None
    flags: list[Literal["damage", "police"]] = []
    steps: list[EstateStep] = []


class Record(_S, kw_only=True):
    schema: Literal["gatehouse.grid.event"]
    v: Literal[1]
    number: str
    revision: int
    kind: Literal["report", "update"]
    title: str
    category: CodeName
    subcategory: CodeName
    source: Literal["物联网感知", "居民上报", "保安上报"]
    source_code: Literal["iot", "resident", "guard"]
    place: Location
    found_at: datetime
    reporter: Who
    description: str
    attachments: list[File] = []
    urgency: Literal["urgent", "high", "normal"]
    estate: EstateHandling
    revised_at: datetime


_record = msgspec.json.Decoder(Record)


def _signature(key: bytes, ts: str, method: str, path: str, body: bytes) -> str:
    text = f"{ts}\n{method}\n{path}\n".encode() + body
    return "hmac-sha256=" + hmac.new(key, text, hashlib.sha256).hexdigest()


def check_record(rec: Record) -> str | None:
    """The platform's own rules beyond the schema; the reason it refuses, or None."""
    import base64
    import binascii

    if not 1 <= len(rec.title) <= 100:
        return "title must have 1 to 100 characters"
    if len(rec.number) < 6 or rec.revision < 1:
        return "number or revision out of range"
    if (rec.kind == "report") != (rec.revision == 1):
        return "revision 1 is the report, later revisions are updates"
    if not rec.place.grid_code:
        return "place.grid_code is required"
    for f in rec.attachments:
        try:
            data = base64.b64decode(f.data, validate=True)
        except (binascii.Error, ValueError):
            return f"attachment {f.name}: data is not base64"
        if len(data) != f.size or hashlib.sha256(data).hexdigest() != f.sha256:
            return f"attachment {f.name}: size or sha256 does not match the data"
    return None


# ---------------------------------------------------------------- the platform


class Platform:
    def __init__(
        self,
        key: bytes,
        key_id: str,
        callback: str,
        categories: set[str],
        *,
        auto: bool,
        delays: tuple[float, float, float],
        reject_every: int,
        outage: tuple[float, float],
        ssl_client: ssl.SSLContext | None,
    ) -> None:
        self.key, self.key_id, self.callback = key, key_id, callback
        self.categories = categories
        self.auto, self.delays, self.reject_every = auto, delays, reject_every
        self.outage = outage
        self.ssl_client = ssl_client
        self.records: dict[str, dict[str, Any]] = {}  # number → {"case_id", "revisions", "last", "history"}
        self.counts = {
            "requests": 0,
            "accepted": 0,
            "duplicates": 0,
            "rejected": 0,
            "unsigned": 0,
            "polls": 0,
            "failed": 0,
        }
        self.down: str | None = None  # refuse | 503 | hang
        self.slow_s = 0.0
        self.fragment: tuple[int, float] = (0, 0.0)  # bytes a piece, seconds between pieces (0: whole)
        self.reject: dict[str, Any] = {"count": 0, "status": 422, "reason": ""}
        self.fail_case: dict[str, Any] = {"status": 0, "number": None}  # /fail-case: its status, the case's number
        self.twice = False
        self.callbacks: list[dict[str, Any]] = []
        self._seq = 0
        self._cb_seq = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.http: aiohttp.ClientSession | None = None
        self.site: web.TCPSite | None = None
        self.runner: web.AppRunner | None = None
        self.host, self.port = "127.0.0.1", 0
        self.ssl_server: ssl.SSLContext | None = None
        self.released = asyncio.Event()  # set while not hanging
        self.released.set()

    def spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- the platform's API

    def _verify(self, request: web.Request, body: bytes) -> str | None:
        kid = request.headers.get("X-Grid-Key-Id", "")
        ts = request.headers.get("X-Grid-Timestamp", "")
        sig = request.headers.get("X-Grid-Signature", "")
        if kid != self.key_id:
            return f"unknown key id {kid!r}"
        if not ts.isdigit() or abs(int(ts) - time.time()) > WINDOW_S:
            return "timestamp missing or outside the window"
        if not hmac.compare_digest(_signature(self.key, ts, request.method, request.path, body), sig):
            return "bad signature"
        return None

    async def _gate(self) -> web.Response | None:
        self.counts["requests"] += 1
        if self.down == "503":
            return web.json_response({"error": "unavailable", "detail": "维护中"}, status=503)
        if self.down == "hang":  # taken, never answered (until the test lets go)
            await self.released.wait()
        return None

    async def _answer(self, request: web.Request, answer: web.Response) -> web.StreamResponse:
        """``answer`` as it is, or (``/fragment``) its headers first and then its body in pieces."""
        size, pause_s = self.fragment
        body = answer.body
        if not size or not isinstance(body, bytes):
            return answer
        out = web.StreamResponse(status=answer.status, headers={"Content-Type": answer.headers["Content-Type"]})
        out.content_length = len(body)
        await out.prepare(request)
        for i in range(0, len(body), size):
            if i:
                await asyncio.sleep(pause_s)
            await out.write(body[i : i + size])
        await out.write_eof()
        return out

    async def post_event(self, request: web.Request) -> web.StreamResponse:
        answer = await self._post_event(request)
        if self.slow_s:  # the record is taken at once; the answer comes late (past the caller's timeout, maybe)
            await asyncio.sleep(self.slow_s)
        return await self._answer(request, answer)

    async def _post_event(self, request: web.Request) -> web.Response:
        gate = await self._gate()
        if gate is not None:
            return gate
        body = await request.read()
        why = self._verify(request, body)
        if why is not None:
            self.counts["unsigned"] += 1
            return web.json_response({"error": "unauthorized", "detail": why}, status=401)
        try:
            rec = _record.decode(body)
        except msgspec.ValidationError as e:
            self.counts["rejected"] += 1
            return web.json_response({"error": "invalid", "detail": str(e)}, status=400)
        except msgspec.DecodeError as e:
            self.counts["rejected"] += 1
            return web.json_response({"error": "malformed", "detail": str(e)}, status=400)
        known = self.records.get(rec.number)
        fail = self.fail_case
        if fail["status"] and (rec.number == fail["number"] or (known is None and fail["number"] is None)):
            fail["number"] = rec.number
            self.counts["failed"] += 1
            return web.json_response({"error": "internal", "detail": "事件处理失败"}, status=int(fail["status"]))
        if known is not None and rec.revision in known["revisions"]:
            self.counts["duplicates"] += 1
            return web.json_response(
                {"number": rec.number, "revision": rec.revision, "case_id": known["case_id"], "duplicate": True}
            )
        why = check_record(rec)
        if why is None and self.categories and rec.category.code not in self.categories:
            why = f"category {rec.category.code} ({rec.category.name}) is not in the platform's table"
        if why is None and self.reject["count"] > 0:
            self.reject["count"] -= 1
            self.counts["rejected"] += 1
            return web.json_response(
                {"error": "rejected", "detail": self.reject["reason"] or "字段不符合要求"},
                status=int(self.reject["status"]),
            )
        if why is None and self.auto and self.reject_every and (self.counts["accepted"] + 1) % self.reject_every == 0:
            why = "demo: every n-th record is refused"
        if why is not None:
            self.counts["rejected"] += 1
            return web.json_response({"error": "invalid", "detail": why}, status=422)
        if known is None:
            if rec.kind != "report":
                self.counts["rejected"] += 1
                return web.json_response(
                    {"error": "unknown-event", "detail": "an update before its report"}, status=404
                )
            self._seq += 1
            known = self.records[rec.number] = {
                "case_id": f"WG{datetime.now(UTC):%Y%m%d}{self._seq:05d}",
                "revisions": [],
                "last": None,
                "history": [],
                "status": None,
            }
            if self.auto:
                self.spawn(self._auto(rec.number))
        known["revisions"].append(rec.revision)
        if known["last"] is None or rec.revision >= known["last"]["revision"]:
            known["last"] = msgspec.to_builtins(rec)
        self.counts["accepted"] += 1
        return web.json_response(
            {"number": rec.number, "revision": rec.revision, "case_id": known["case_id"], "duplicate": False},
            status=201,
        )

    async def get_event(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, await self._get_event(request))

    async def _get_event(self, request: web.Request) -> web.Response:
        gate = await self._gate()
        if gate is not None:
            return gate
        why = self._verify(request, b"")
        if why is not None:
            self.counts["unsigned"] += 1
            return web.json_response({"error": "unauthorized", "detail": why}, status=401)
        self.counts["polls"] += 1
        number = request.match_info["number"]
        known = self.records.get(number)
        if known is None:
            return web.json_response({"error": "unknown-event"}, status=404)
        return web.json_response({"number": number, "case_id": known["case_id"], "history": known["history"]})

    # -- the case flow and callbacks

    async def move(self, number: str, status: str, by: str = "", note: str = "") -> list[dict[str, Any]]:
        known = self.records.get(number)
        if known is None:
            raise ControlError(404, f"no case {number}")
        if status not in STATUS_NAMES:
            raise ControlError(400, f"status is one of {', '.join(STATUS_NAMES)}")
        self._cb_seq += 1
        entry = {
            "schema": "gatehouse.grid.status",
            "v": 1,
            "callback_id": f"cb-{os.getpid()}-{self._cb_seq}",
            "number": number,
            "case_id": known["case_id"],
            "status": status,
            "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "by": by,
            "note": note,
        }
        known["history"].append(entry)
        known["status"] = status
        results = [await self.call_back(entry)]
        if self.twice:
            results.append(await self.call_back(entry))
        return results

    async def call_back(self, entry: dict[str, Any], attempts: int = 1) -> dict[str, Any]:
        """Send one status to the estate; a failure is tried again in the background (up to 8 times)."""
        out: dict[str, Any] = {"callback_id": entry["callback_id"], "status": entry["status"]}
        if not self.callback or self.http is None:
            out["error"] = "no callback URL"
            self.callbacks.append(out)
            return out
        body = json.dumps(entry, ensure_ascii=False).encode()
        path = URL(self.callback).path
        ts = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Grid-Key-Id": self.key_id,
            "X-Grid-Timestamp": ts,
            "X-Grid-Signature": _signature(self.key, ts, "POST", path, body),
        }
        try:
            async with self.http.post(
                self.callback,
                data=body,
                headers=headers,
                ssl=self.ssl_client or True,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as r:
                out["http"] = r.status
                out["answer"] = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            out["error"] = type(e).__name__
        self.callbacks.append(out)
        if ("error" in out or out.get("http", 500) >= 500) and attempts < 8:

            async def again() -> None:
                await asyncio.sleep(min(60.0, 0.5 * 2**attempts))
                await self.call_back(entry, attempts + 1)

            self.spawn(again())
        return out

    async def _auto(self, number: str) -> None:
        a, d, c = self.delays
        for wait, status, by in (
            (a, "accepted", "街道指挥中心"),
            (d, "dispatched", "网格员 李四"),
            (c, "closed", "网格员 李四"),
        ):
            await asyncio.sleep(wait)
            with contextlib.suppress(ControlError):
                await self.move(number, status, by, "演示平台自动流转")

    async def _outages(self) -> None:
        every, length = self.outage
        while True:
            await asyncio.sleep(every)
            await self.set_down("refuse")
            await asyncio.sleep(length)
            await self.set_down(None)

    # -- going down and up

    async def set_down(self, how: str | None) -> None:
        if how == self.down:
            return
        if self.down == "refuse" and self.runner is not None:
            self.site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.ssl_server)
            await self.site.start()
        if how == "refuse" and self.site is not None:
            await self.site.stop()
            self.site = None
        self.down = how
        if how == "hang":
            self.released.clear()
        else:
            self.released.set()

    def state(self) -> dict[str, Any]:
        return {
            "records": {
                n: {
                    "case_id": r["case_id"],
                    "revisions": r["revisions"],
                    "status": r["status"],
                    "last": r["last"],
                    "history": r["history"],
                }
                for n, r in self.records.items()
            },
            "counts": dict(self.counts),
            "down": self.down,
            "slow_s": self.slow_s,
            "fragment": {"bytes": self.fragment[0], "pause_s": self.fragment[1]},
            "reject": dict(self.reject),
            "fail_case": dict(self.fail_case),
            "callback_twice": self.twice,
            "callbacks": self.callbacks[-200:],
            "callback_url": self.callback,
            "mono": time.monotonic(),
        }


# ---------------------------------------------------------------- the process


def _control_app(p: Platform) -> web.Application:
    app = web.Application()

    def route(method: str, path: str, fn: Any) -> None:
        async def handler(request: web.Request) -> web.Response:
            try:
                body = await _json_body(request) if method == "POST" else {}
                out = await fn(request, body)
            except ControlError as e:
                return web.json_response({"ok": False, "error": str(e)}, status=e.status)
            return web.json_response({"ok": True, **out})

        app.router.add_route(method, path, handler)

    async def state(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        return p.state()

    async def down(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        how = body.get("how", "refuse")
        if how not in ("refuse", "503", "hang"):
            raise ControlError(400, "how is refuse, 503 or hang")
        await p.set_down(how if body.get("on", True) else None)
        return {"down": p.down}

    async def slow(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        s = body.get("s", 0)
        if not isinstance(s, int | float) or not 0 <= s <= 600:
            raise ControlError(400, "s is 0 to 600 seconds")
        p.slow_s = float(s)
        return {}

    async def fragment(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        size, pause_s = body.get("bytes", 16), body.get("pause_s", 0.05)
        if not isinstance(size, int) or size < 0 or not isinstance(pause_s, int | float) or not 0 <= pause_s <= 10:
            raise ControlError(400, "bytes is a count (0: whole), pause_s 0 to 10 seconds")
        p.fragment = (size, float(pause_s))
        return {}

    async def fail_case(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        status = body.get("status", 500)
        if not isinstance(status, int) or not (status == 0 or 500 <= status <= 599):
            raise ControlError(400, "status is a 5xx (0: no longer)")
        p.fail_case = {"status": status, "number": None}
        return {}

    async def reject(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        count, status = body.get("count", 1), body.get("status", 422)
        if not isinstance(count, int) or not isinstance(status, int) or not 400 <= status <= 499:
            raise ControlError(400, "count is an integer, status a 4xx")
        p.reject = {"count": count, "status": status, "reason": str(body.get("reason", ""))[:200]}
        return {}

    async def twice(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        p.twice = bool(body.get("on", True))
        return {}

    async def status(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        results = await p.move(
            request.match_info["number"],
            str(body.get("status", "")),
            str(body.get("by", "")),
            str(body.get("note", "")),
        )
        return {"callbacks": results}

    async def callback_url(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        p.callback = str(body.get("url", ""))
        return {}

    route("GET", "/state", state)
    route("POST", "/down", down)
    route("POST", "/slow", slow)
    route("POST", "/fragment", fragment)
    route("POST", "/reject", reject)
    route("POST", "/fail-case", fail_case)
    route("POST", "/callback-twice", twice)
    route("POST", "/cases/{number}/status", status)
    route("POST", "/callback-url", callback_url)
    return app


async def run(args: argparse.Namespace, key: bytes) -> None:
    client_ssl = None
    server_ssl = None
    if args.tls_cert:
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ssl.load_cert_chain(args.tls_cert, args.tls_key)
        if args.client_ca:
            server_ssl.verify_mode = ssl.CERT_REQUIRED
            server_ssl.load_verify_locations(args.client_ca)
    if args.callback_ca:
        client_ssl = ssl.create_default_context(cafile=args.callback_ca)
    cats = {c.strip() for c in args.categories.split(",") if c.strip()} if args.categories else set()
    p = Platform(
        key,
        args.key_id,
        args.callback or "",
        cats,
        auto=args.auto,
        delays=(args.accept_after, args.dispatch_after, args.close_after),
        reject_every=args.reject_every,
        outage=(args.outage_every, args.outage_for),
        ssl_client=client_ssl,
    )
    p.ssl_server = server_ssl
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    api = web.Application(client_max_size=32 * 1024 * 1024)
    api.router.add_post(f"{BASE}/events", p.post_event)
    api.router.add_get(f"{BASE}/events/{{number}}", p.get_event)
    p.runner = web.AppRunner(api, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    control = web.AppRunner(_control_app(p), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    p.http = aiohttp.ClientSession()
    try:
        await p.runner.setup()
        host, port = parse_hostport(args.listen)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        p.host, p.port = sock.getsockname()[:2]
        sock.close()  # the port is ours to bind again (SO_REUSEADDR), as it is after each outage
        p.site = web.TCPSite(p.runner, p.host, p.port, ssl_context=server_ssl)
        await p.site.start()
        await control.setup()
        csock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        csock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        csock.bind(parse_hostport(args.control))
        await web.SockSite(control, csock).start()
        chost, cport = csock.getsockname()[:2]
        if args.outage_every and args.outage_for:
            p.spawn(p._outages())
        scheme = "https" if server_ssl else "http"
        sys.stdout.write(
            json.dumps(
                {
                    "ready": True,
                    "url": f"{scheme}://{p.host}:{p.port}{BASE}",
                    "control": f"http://{chost}:{cport}",
                    "pid": os.getpid(),
                }
            )
            + "\n"
        )
        sys.stdout.flush()
        await stop.wait()
    finally:
        for t in list(p._tasks):
            t.cancel()
        await control.cleanup()
        await p.runner.cleanup()
        await p.http.close()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m firmware_stubs.grid_platform", description="Grid-governance platform stub (docs/grid.md)"
    )
    ap.add_argument("--key-file", required=True, help="the HMAC key shared with the estate")
    ap.add_argument("--key-id", default="gatehouse", help="the estate's key id (X-Grid-Key-Id)")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--control", default="127.0.0.1:0")
    ap.add_argument("--callback", default="", help="the estate's status callback URL")
    ap.add_argument("--callback-ca", default="", help="the CA of the estate's certificate (https callbacks)")
    ap.add_argument("--tls-cert", default="")
    ap.add_argument("--tls-key", default="")
    ap.add_argument("--client-ca", default="", help="require client certificates signed by this CA (mutual TLS)")
    ap.add_argument("--categories", default="", help="category codes the platform knows (default: any)")
    ap.add_argument("--auto", action="store_true", help="accept, dispatch and close cases by themselves (demo)")
    ap.add_argument("--accept-after", type=float, default=5.0)
    ap.add_argument("--dispatch-after", type=float, default=20.0)
    ap.add_argument("--close-after", type=float, default=60.0)
    ap.add_argument("--reject-every", type=int, default=0)
    ap.add_argument("--outage-every", type=float, default=0.0)
    ap.add_argument("--outage-for", type=float, default=0.0)
    args = ap.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    asyncio.run(run(args, Path(args.key_file).read_text(encoding="utf-8").strip().encode()))


if __name__ == "__main__":
    main()
