"""Simulated indoor alarm panel (or alarm receiver automation port) speaking Contact ID on a pty.

    python -m firmware_stubs.indoor_panel --pty [--mode panel|receiver] --account 1234 \\
        --control 127.0.0.1:0

Prints one JSON line when ready: ``{"ready": true, "serial": "/dev/pts/N", "control": "http://..."}``.

Written from the public documents (SIA DC-05 for the message, the Sur-Gard MLR2 manuals for the
automation port), not from the gateway's driver, so a misreading shows up as a disagreement:

* panel mode: 16 ASCII digits ``AAAA 18 Q XYZ GG CCC S`` + CR LF. Checksum: every digit counts
  its value, zero counts ten, and the total must divide by 15. Waits ``--ack-timeout`` for an ACK
  (0x06); on NAK (0x15) or silence sends again, at most ``--retries`` more times, then gives up.
* receiver mode: ``5RRL 18AAAAQXYZGGCCC`` + DC4 (Q = E/R/P), heartbeats ``1RRL`` + 11 spaces +
  ``@`` + 4 spaces + DC4 every ``--heartbeat-interval`` s; ACK expected within 4 s, 3 retries.

Control API (JSON over HTTP on loopback), all answering ``{"ok": true, ...}`` or 400 with an error:

  POST /event            {"code", "qualifier": new|restore|status, "zone", "partition", "account"}
  POST /zone/{n}/trip    POST /zone/{n}/restore      (burglary 130; body {"code": ...} optional)
  POST /alarm/{kind}     kind: fire panic medical gas tamper burglary ac_loss low_battery test;
                         body {"zone": n, "restore": false}
  POST /user/{n}/open    POST /user/{n}/close         (401, open = new, close = restore)
  POST /silent           {"on": true}   no output at all: no frames, resends, tests or heartbeats
  POST /garbage          {"bytes": n, "seed": s}   n random bytes, in turn with the frames
  POST /bad-checksum     {"count": n, ...event}    n frames with a wrong checksum, not resent
                         (both wait for the line to settle before the next frame goes out)
  POST /corrupt-next     {"count": n}   the next n transmissions go out with a wrong checksum
  POST /ignore-acks      {"count": n}   the next n ACKs are ignored (as if lost on the line)
  POST /fragment         {"on": true}   write frames a few bytes at a time, with short pauses
  GET  /state            counters: frames_sent, transmissions, acks_received, naks_received, ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import re
import signal
import tty
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

ACK_BYTE = 0x06
NAK_BYTE = 0x15
TERMINATOR_RECEIVER = b"\x14"
TERMINATOR_PANEL = b"\r\n"

HEX_DIGITS = "0123456789ABCDEF"
QUALIFIER_DIGIT = {"new": "1", "restore": "3", "status": "6"}
QUALIFIER_LETTER = {"new": "E", "restore": "R", "status": "P"}

# Event codes from the Contact ID event list (DC-05 appendix / panel manuals).
ALARM_CODES = {
    "medical": 100,
    "fire": 110,
    "panic": 120,
    "burglary": 130,
    "tamper": 137,
    "gas": 151,
    "ac_loss": 301,
    "low_battery": 302,
    "test": 602,
}
OPEN_CLOSE = 401
PERIODIC_TEST = 602


def weight(ch: str) -> int:
    """DTMF digit weight: '0' (and 'A', the DTMF spelling of zero) weigh ten."""
    v = HEX_DIGITS.index(ch)
    return 10 if v == 0 else v


def add_checksum(fifteen: str) -> str:
    total = 0
    for ch in fifteen:
        total += weight(ch)
    need = 15 - total % 15  # 1..15: a total already divisible by 15 takes an F
    return fifteen + ("0" if need == 10 else HEX_DIGITS[need])


def wrong_checksum(sixteen: str) -> str:
    """The same message with another, wrong check digit."""
    good = weight(sixteen[-1])
    bad = good % 15 + 1  # 1..15, never the good one
    return sixteen[:-1] + ("0" if bad == 10 else HEX_DIGITS[bad])


@dataclass
class Event:
    account: str
    qualifier: str
    code: int
    partition: int
    zone: int


@dataclass
class Outgoing:
    payload: bytes  # the frame as it goes out when correct
    corrupt: bytes | None  # the same with a wrong checksum (panel mode), else a broken copy
    kind: str  # event | test | heartbeat | raw (garbage, bad frames: written, no answer awaited)


class Pty:
    """The panel's end of a pseudo-terminal: raw mode, non-blocking, with a write buffer."""

    def __init__(self, on_bytes: Any) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no CR/LF translation, even before the driver opens it
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self._loop = asyncio.get_running_loop()
        self._out = bytearray()
        self._writing = False
        self.queued_total = 0  # bytes ever given to write()
        self.flushed_total = 0  # bytes ever handed to the kernel
        self._on_bytes = on_bytes
        self._empty = asyncio.Event()
        self._empty.set()
        self._loop.add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO while nobody has the slave open: nothing to read
        if data:
            self._on_bytes(data)

    async def drained(self) -> None:
        """Until every byte written so far has been handed to the kernel."""
        await self._empty.wait()

    def write(self, data: bytes) -> None:
        self._empty.clear()
        self._out += data
        self.queued_total += len(data)
        self._flush()

    def _flush(self) -> None:
        while self._out:
            try:
                n = os.write(self.master, self._out[:65536])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._out.clear()
                break
            del self._out[:n]
            self.flushed_total += n
        if self._out and not self._writing:
            self._loop.add_writer(self.master, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self._loop.remove_writer(self.master)
            self._writing = False
        if not self._out:
            self._empty.set()

    @property
    def pending(self) -> int:
        return len(self._out)

    def close(self) -> None:
        self._loop.remove_reader(self.master)
        if self._writing:
            self._loop.remove_writer(self.master)
        os.close(self.master)
        os.close(self.slave)


class Panel:
    def __init__(self, args: argparse.Namespace) -> None:
        self.mode: str = args.mode
        self.account: str = args.account
        self.partition: int = args.partition
        self.receiver: str = args.receiver
        self.line: str = args.line
        self.ack_timeout: float = (
            args.ack_timeout if args.ack_timeout is not None else (4.0 if self.mode == "receiver" else 2.0)
        )
        self.retries: int = args.retries if args.retries is not None else 3
        self.test_interval: float = args.test_interval
        self.heartbeat_interval: float = args.heartbeat_interval
        self.queue: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.reply = asyncio.Event()
        self.reply_was_ack = False
        self.silent = False
        self.unsilenced = asyncio.Event()
        self.unsilenced.set()
        self.fragment = False
        self.ignore_acks = 0
        self.corrupt_next = 0
        self.in_flight = False
        self.awaiting = False  # a reply now answers the frame whose last byte is at frame_end
        self.frame_end = 0
        self.counts = {
            "frames_sent": 0,
            "transmissions": 0,
            "resends": 0,
            "acks_received": 0,
            "naks_received": 0,
            "acks_ignored": 0,
            "stray_replies": 0,
            "delivered": 0,
            "given_up": 0,
            "tests_sent": 0,
            "heartbeats_sent": 0,
            "garbage_bytes_sent": 0,
            "bad_frames_sent": 0,
            "corrupted_transmissions": 0,
        }
        self.pty = Pty(self.on_bytes)

    # ------------------------------------------------------------ framing (own implementation)

    def frame(self, ev: Event) -> Outgoing:
        if self.mode == "panel":
            body = f"{ev.account}18{QUALIFIER_DIGIT[ev.qualifier]}{ev.code:03d}{ev.partition:02d}{ev.zone:03d}"
            good = add_checksum(body)
            return Outgoing(good.encode() + TERMINATOR_PANEL, wrong_checksum(good).encode() + TERMINATOR_PANEL, "event")
        text = (
            f"5{self.receiver}{self.line} 18{ev.account}{QUALIFIER_LETTER[ev.qualifier]}"
            f"{ev.code:03d}{ev.partition:02d}{ev.zone:03d}"
        )
        # The receiver's line has no checksum: a corrupted one has a control byte inside.
        broken = text[:8] + "\x07" + text[9:]
        return Outgoing(text.encode() + TERMINATOR_RECEIVER, broken.encode() + TERMINATOR_RECEIVER, "event")

    def periodic_test(self) -> Outgoing:
        out = self.frame(self.event("new", PERIODIC_TEST, 0, 0))
        out.kind = "test"
        return out

    def heartbeat(self) -> Outgoing:
        text = "1" + self.receiver + self.line + " " * 11 + "@" + " " * 4
        return Outgoing(text.encode() + TERMINATOR_RECEIVER, None, "heartbeat")

    # ------------------------------------------------------------ line

    def on_bytes(self, data: bytes) -> None:
        """The first ACK or NAK after the frame went out answers it. Earlier ones (about garbage
        still queued ahead of the frame) and later ones are counted as stray."""
        for b in data:
            if b not in (ACK_BYTE, NAK_BYTE):
                continue
            ack = b == ACK_BYTE
            self.counts["acks_received" if ack else "naks_received"] += 1
            if not self.awaiting or self.pty.flushed_total < self.frame_end:
                self.counts["stray_replies"] += 1
                continue
            if ack and self.ignore_acks > 0:
                self.ignore_acks -= 1
                self.counts["acks_ignored"] += 1
                continue
            self.awaiting = False
            self.reply_was_ack = ack
            self.reply.set()

    async def write(self, data: bytes) -> None:
        if not self.fragment:
            self.pty.write(data)
            return
        i = 0
        while i < len(data):
            n = random.randint(1, 3)
            self.pty.write(data[i : i + n])
            i += n
            await asyncio.sleep(0.005)

    async def sender(self) -> None:
        while True:
            out = await self.queue.get()
            self.in_flight = True
            try:
                await self._deliver(out)
            finally:
                self.in_flight = False
                self.queue.task_done()

    async def _write_raw(self, out: Outgoing) -> None:
        """Write bytes that expect no answer, then let the line settle: wait until the driver has
        been quiet for 0.2 s (at most 10 s), so its NAKs for them are not taken as answers to the
        next frame."""
        await self.unsilenced.wait()
        self.pty.write(out.payload)  # never fragmented: a megabyte a few bytes at a time takes hours
        await self.pty.drained()
        async with asyncio.timeout(10.0):
            while True:
                before = self.counts["acks_received"] + self.counts["naks_received"]
                await asyncio.sleep(0.2)
                if self.counts["acks_received"] + self.counts["naks_received"] == before:
                    return

    async def _deliver(self, out: Outgoing) -> None:
        if out.kind == "raw":
            with contextlib.suppress(TimeoutError):
                await self._write_raw(out)
            return
        self.counts["frames_sent"] += 1
        if out.kind != "event":
            self.counts["tests_sent" if out.kind == "test" else "heartbeats_sent"] += 1
        for attempt in range(self.retries + 1):
            await self.unsilenced.wait()
            if attempt:
                self.counts["resends"] += 1
            self.reply.clear()
            data = out.payload
            if self.corrupt_next > 0 and out.corrupt is not None:
                self.corrupt_next -= 1
                self.counts["corrupted_transmissions"] += 1
                data = out.corrupt
            self.counts["transmissions"] += 1
            # A reply counts once the frame is complete on the line: its CR is enough, the LF after
            # it may still be on its way (the driver answers at the first terminator byte).
            self.frame_end = self.pty.queued_total + len(data.removesuffix(b"\n"))
            self.awaiting = True
            await self.write(data)
            try:
                async with asyncio.timeout(self.ack_timeout):
                    await self.reply.wait()
            except TimeoutError:
                continue
            finally:
                self.awaiting = False
            if self.reply_was_ack:
                self.counts["delivered"] += 1
                return
        self.counts["given_up"] += 1

    async def periodic(self, interval: float, make: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.silent:
                continue
            await self.queue.put(make())

    def enqueue(self, ev: Event) -> None:
        self.queue.put_nowait(self.frame(ev))

    def event(
        self, qualifier: str, code: int, zone: int = 0, partition: int | None = None, account: str | None = None
    ) -> Event:
        return Event(account or self.account, qualifier, code, self.partition if partition is None else partition, zone)

    def state(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "serial": self.pty.path,
            **self.counts,
            "queued": self.queue.qsize(),
            "in_flight": self.in_flight,
            "idle": self.queue.qsize() == 0 and not self.in_flight and self.pty.pending == 0,
            "silent": self.silent,
            "fragment": self.fragment,
            "ignore_acks": self.ignore_acks,
            "corrupt_next": self.corrupt_next,
        }


# ------------------------------------------------------------ control API


class BadRequest(Exception):
    pass


def _int(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f"{key} must be an integer {lo}..{hi}")
    return v


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    v = body.get(key, default)
    if not isinstance(v, bool):
        raise BadRequest(f"{key} must be true or false")
    return v


def _account(v: Any, default: str) -> str:
    if v is None:
        return default
    if not isinstance(v, str) or len(v) != 4 or any(c not in "0123456789BCDEF" for c in v):
        raise BadRequest("account must be 4 characters of 0-9, B-F")
    return v


def _qualifier(v: Any) -> str:
    names = {"1": "new", "3": "restore", "6": "status", 1: "new", 3: "restore", 6: "status"}
    if not isinstance(v, str | int):
        raise BadRequest("qualifier must be new, restore or status (or 1, 3, 6)")
    if v in QUALIFIER_DIGIT:
        return str(v)
    if v in names:
        return names[v]
    raise BadRequest("qualifier must be new, restore or status (or 1, 3, 6)")


def _json_answer(
    handler: Callable[[web.Request], Awaitable[dict[str, Any]]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler's answer as ``{"ok": true, ...}``; a :class:`BadRequest` as ``{"ok": false, "error": ...}``, 400."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            result = await handler(request)
        except BadRequest as e:
            return web.json_response({"ok": False, "error": str(e)}, status=400)
        return web.json_response({"ok": True, **result})

    return answer


def build_app(panel: Panel) -> web.Application:
    routes = web.RouteTableDef()

    async def body_of(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    def event_from(body: dict[str, Any]) -> Event:
        return panel.event(
            _qualifier(body.get("qualifier", "new")),
            _int(body, "code", 0, 0, 999),
            _int(body, "zone", 0, 0, 999),
            _int(body, "partition", panel.partition, 0, 99),
            _account(body.get("account"), panel.account),
        )

    @routes.post("/event")
    @_json_answer
    async def post_event(request: web.Request) -> dict[str, Any]:
        body = await body_of(request)
        if "code" not in body:
            raise BadRequest("code is required")
        panel.enqueue(event_from(body))
        return {}

    @routes.post("/zone/{zone}/{action}")
    @_json_answer
    async def post_zone(request: web.Request) -> dict[str, Any]:
        body = await body_of(request)
        action = request.match_info["action"]
        if action not in ("trip", "restore"):
            raise BadRequest("action is trip or restore")
        zone = _int({"zone": _path_int(request, "zone")}, "zone", 0, 1, 999)
        code = _int(body, "code", ALARM_CODES["burglary"], 0, 999)
        panel.enqueue(panel.event("new" if action == "trip" else "restore", code, zone))
        return {}

    @routes.post("/alarm/{kind}")
    @_json_answer
    async def post_alarm(request: web.Request) -> dict[str, Any]:
        kind = request.match_info["kind"]
        if kind not in ALARM_CODES:
            raise BadRequest(f"kind is one of {', '.join(sorted(ALARM_CODES))}")
        body = await body_of(request)
        zone = _int(body, "zone", 0, 0, 999)
        restore = _bool(body, "restore", False)
        partition = 0 if kind in ("ac_loss", "low_battery", "test") else None
        panel.enqueue(panel.event("restore" if restore else "new", ALARM_CODES[kind], zone, partition))
        return {}

    @routes.post("/user/{user}/{action}")
    @_json_answer
    async def post_user(request: web.Request) -> dict[str, Any]:
        action = request.match_info["action"]
        if action not in ("open", "close"):
            raise BadRequest("action is open or close")
        user = _int({"user": _path_int(request, "user")}, "user", 0, 0, 999)
        panel.enqueue(panel.event("new" if action == "open" else "restore", OPEN_CLOSE, user))
        return {}

    @routes.post("/silent")
    @_json_answer
    async def post_silent(request: web.Request) -> dict[str, Any]:
        panel.silent = _bool(await body_of(request), "on", True)
        if panel.silent:
            panel.unsilenced.clear()
        else:
            panel.unsilenced.set()
        return {"silent": panel.silent}

    @routes.post("/garbage")
    @_json_answer
    async def post_garbage(request: web.Request) -> dict[str, Any]:
        body = await body_of(request)
        n = _int(body, "bytes", 64, 1, 16 * 1024 * 1024)
        seed = _int(body, "seed", random.randrange(1 << 30), 0, 1 << 62)
        if not panel.silent:
            panel.queue.put_nowait(Outgoing(random.Random(seed).randbytes(n), None, "raw"))
            panel.counts["garbage_bytes_sent"] += n
        return {"seed": seed}

    @routes.post("/bad-checksum")
    @_json_answer
    async def post_bad(request: web.Request) -> dict[str, Any]:
        body = await body_of(request)
        count = _int(body, "count", 1, 1, 1000)
        ev = event_from({"code": 130, "zone": 1, **body})
        out = panel.frame(ev)
        if not panel.silent and out.corrupt is not None:
            panel.queue.put_nowait(Outgoing(out.corrupt * count, None, "raw"))
            panel.counts["bad_frames_sent"] += count
        return {}

    @routes.post("/corrupt-next")
    @_json_answer
    async def post_corrupt(request: web.Request) -> dict[str, Any]:
        panel.corrupt_next = _int(await body_of(request), "count", 1, 0, 1000)
        return {}

    @routes.post("/ignore-acks")
    @_json_answer
    async def post_ignore(request: web.Request) -> dict[str, Any]:
        panel.ignore_acks = _int(await body_of(request), "count", 1, 0, 1000)
        return {}

    @routes.post("/fragment")
    @_json_answer
    async def post_fragment(request: web.Request) -> dict[str, Any]:
        panel.fragment = _bool(await body_of(request), "on", True)
        return {}

    @routes.get("/state")
    @_json_answer
    async def get_state(request: web.Request) -> dict[str, Any]:
        return panel.state()

    app = web.Application()
    app.add_routes(routes)
    return app


def _path_int(request: web.Request, key: str) -> int:
    try:
        return int(request.match_info[key])
    except ValueError:
        raise BadRequest(f"{key} must be a number") from None


# ------------------------------------------------------------ process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m firmware_stubs.indoor_panel", description=__doc__.split("\n")[0])
    p.add_argument("--pty", action="store_true", required=True, help="create a pseudo-terminal (the only transport)")
    p.add_argument("--mode", choices=("panel", "receiver"), default="panel")
    p.add_argument("--account", default="1234", help="4 digits, 0-9 and B-F")
    p.add_argument("--partition", type=int, default=1)
    p.add_argument("--control", default="127.0.0.1:0", help="loopback host:port of the control API")
    p.add_argument("--ack-timeout", type=float, default=None, help="seconds; default 2 (panel), 4 (receiver)")
    p.add_argument("--retries", type=int, default=None, help="resends after the first try; default 3")
    p.add_argument("--test-interval", type=float, default=0.0, help="periodic test (602) every N s; 0 = off")
    p.add_argument("--heartbeat-interval", type=float, default=30.0, help="receiver mode; 0 = off")
    p.add_argument("--receiver", default="01", help="receiver number RR (receiver mode)")
    p.add_argument("--line", default="1", help="line number L (receiver mode)")
    args = p.parse_args(argv)
    try:
        _account(args.account, "")
    except BadRequest as e:
        p.error(str(e))
    host, _, port = args.control.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]") or not port.isdigit():
        p.error("--control must be a loopback host:port")
    args.control_host, args.control_port = host.strip("[]"), int(port)
    if len(args.receiver) != 2 or any(c not in HEX_DIGITS for c in args.receiver):
        p.error("--receiver is two hex digits")
    if not re.fullmatch(r"[0-9A-Z]", args.line):
        p.error("--line is one digit or capital letter")
    if args.retries is not None and not 0 <= args.retries <= 20:
        p.error("--retries is 0..20")
    return args


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    panel = Panel(args)
    runner = web.AppRunner(build_app(panel), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.control_host, args.control_port)
    await site.start()
    host, port = runner.addresses[0][:2]
    tasks = [asyncio.create_task(panel.sender(), name="indoor_panel.sender")]
    if args.test_interval > 0:
        tasks.append(
            asyncio.create_task(panel.periodic(args.test_interval, panel.periodic_test), name="indoor_panel.tests")
        )
    if args.mode == "receiver" and args.heartbeat_interval > 0:
        tasks.append(
            asyncio.create_task(panel.periodic(args.heartbeat_interval, panel.heartbeat), name="indoor_panel.heartbeat")
        )
    control_host = f"[{host}]" if ":" in host else host
    print(json.dumps({"ready": True, "serial": panel.pty.path, "control": f"http://{control_host}:{port}"}), flush=True)
    try:
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await runner.cleanup()
        panel.pty.close()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
