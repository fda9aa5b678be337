"""Firmware stub of QR readers on a serial line, written from docs/profiles.md ("QR readers"): one reader
sending plain lines, or several addressed readers sharing one RS-485 line (``@<address>:`` prefixes),
answering heartbeat polls (``?`` / ``@<address>?`` → ``!`` / ``@<address>!``).

Run::

    python -m firmware_stubs.qr_reader --pty [--addresses 1,2] [--terminator cr|crlf|lf] --control 127.0.0.1:0

It creates a pseudo-terminal (the gateway opens the ``serial`` path of the ready line) and prints::

    {"ready": true, "serial": "/dev/pts/7", "control": "http://127.0.0.1:8081", "pid": 1234, "readers": [null]}

Control API: JSON over HTTP on loopback; ``reader`` is an address (omit it for the only reader).
Answers carry ``mono``, the stub's CLOCK_MONOTONIC (comparable across processes on the machine).

==========================================  ===========================================================
``GET  /state``                             readers (offline, scans, polls heard, answers), counters
``POST /scan``                              ``{"text": "GH1:...", "reader": 1}`` one scanned code;
                                            the answer's ``written`` is the time it was written
``POST /scans``                             ``{"texts": [...], "interval_ms": 40}`` several, spaced;
                                            ``written`` lists the write times
``POST /garbage``                           ``{"length": 32}`` a line of random bytes, some of them not
                                            printable (no CR or LF inside)
``POST /overlong``                          ``{"length": 600}`` a printable line this long
``POST /raw``                               ``{"hex": "0d0a"}`` exactly these bytes
``POST /offline``                           ``{"on": true}`` the reader stops sending and answering
                                            (every reader when ``reader`` is omitted)
==========================================  ===========================================================
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import sys
import time
import tty
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from firmware_stubs.modbus_device import ControlError, _FdTransport, _json_body, parse_hostport

TERMINATORS = {"cr": b"\r", "crlf": b"\r\n", "lf": b"\n"}
MAX_TEXT = 100_000
_POLL = re.compile(rb"(?:@([0-9]{1,3}))?\?")


class _Reader:
    def __init__(self, address: int | None) -> None:
        self.address = address
        self.offline = False
        self.scans = 0
        self.polls = 0
        self.answers = 0

    def prefix(self) -> bytes:
        return b"" if self.address is None else b"@%d:" % self.address

    def state(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "offline": self.offline,
            "scans": self.scans,
            "polls": self.polls,
            "answers": self.answers,
        }


class ReaderLine(asyncio.Protocol):
    """The readers' end of the cable: the master side of a pseudo-terminal."""

    def __init__(self, addresses: Sequence[int | None], terminator: bytes) -> None:
        self.readers = {a: _Reader(a) for a in addresses}
        self.terminator = terminator
        self.serial_path = ""
        self.bytes_out = 0
        self.lines_out = 0
        self.unknown_in = 0
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._fds: tuple[int, int] | None = None
        self._rng = random.Random()

    # -- the pseudo-terminal

    def start(self) -> str:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._fds = (master, slave)  # the slave stays open so the master never sees EIO between openers
        self.serial_path = os.ttyname(slave)
        self._transport = _FdTransport(asyncio.get_running_loop(), master, self)
        return self.serial_path

    def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._fds is not None:
            for fd in self._fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            m = re.search(rb"[\r\n]", self._buf)
            if m is None:
                if len(self._buf) > 1024:
                    self._buf.clear()
                return
            line = bytes(self._buf[: m.start()])
            del self._buf[: m.end()]
            if line:
                self._poll(line)

    def _poll(self, line: bytes) -> None:
        m = _POLL.fullmatch(line)
        if m is None:
            self.unknown_in += 1
            return
        addr = int(m.group(1)) if m.group(1) is not None else None
        r = self.readers.get(addr)
        if r is None:
            return  # a poll for a reader that is not here: stay quiet, as on a shared line
        r.polls += 1
        if not r.offline:
            r.answers += 1
            self._write(b"!" if r.address is None else b"@%d!" % r.address)

    def _write(self, body: bytes) -> float:
        assert self._transport is not None
        data = body + self.terminator
        now = time.monotonic()
        self._transport.write(data)
        self.bytes_out += len(data)
        self.lines_out += 1
        return now

    # -- control

    def reader(self, body: dict[str, Any]) -> _Reader:
        if "reader" not in body:
            if len(self.readers) != 1:
                known = sorted(a for a in self.readers if a is not None)
                raise ControlError(400, f"say which 'reader' (addresses: {known})")
            return next(iter(self.readers.values()))
        a = body["reader"]
        if a not in self.readers or isinstance(a, bool):
            raise ControlError(404, f"no reader {a!r} on this line")
        return self.readers[a]

    def scan(self, r: _Reader, text: str) -> float:
        if r.offline:
            raise ControlError(409, f"reader {r.address} is offline")
        try:
            raw = text.encode("ascii")
        except UnicodeEncodeError:
            raw = text.encode("utf-8")  # a reader would send what the code holds; the gateway refuses it
        r.scans += 1
        return self._write(r.prefix() + raw)

    def garbage(self, r: _Reader, length: int) -> float:
        junk = bytearray(self._rng.choice([0x00, 0x07, 0x1B, 0x7F, 0x80, 0xFF]) for _ in range(max(1, length // 4)))
        junk += bytes(self._rng.randrange(0x20, 0x100) for _ in range(length - len(junk)))
        self._rng.shuffle(junk)
        junk = bytearray(b if b not in (0x0A, 0x0D) else 0x00 for b in junk)
        return self._write(r.prefix() + bytes(junk))

    def state(self) -> dict[str, Any]:
        return {
            "serial": self.serial_path,
            "readers": [r.state() for r in self.readers.values()],
            "bytes_out": self.bytes_out,
            "lines_out": self.lines_out,
            "unknown_in": self.unknown_in,
        }


def _int(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ControlError(400, f"'{key}' must be a whole number {lo}-{hi}, not {v!r}")
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise ControlError(400, f"a scanned text must be a string of at most {MAX_TEXT} characters")
    return v


def make_app(line: ReaderLine) -> web.Application:
    app = web.Application(client_max_size=4 * 1024 * 1024)

    def route(path: str, handler: Any) -> None:
        async def wrapped(request: web.Request) -> web.Response:
            try:
                body = await _json_body(request)
                result = handler(body)
                if asyncio.iscoroutine(result):
                    result = await result
            except ControlError as e:
                return web.json_response({"ok": False, "error": str(e)}, status=e.status)
            result.setdefault("ok", True)
            result.setdefault("mono", time.monotonic())
            return web.json_response(result)

        app.router.add_post(path, wrapped)

    async def state(request: web.Request) -> web.Response:
        return web.json_response({"mono": time.monotonic(), **line.state()})

    def scan(body: dict[str, Any]) -> dict[str, Any]:
        return {"written": line.scan(line.reader(body), _text(body.get("text")))}

    async def scans(body: dict[str, Any]) -> dict[str, Any]:
        texts = body.get("texts")
        if not isinstance(texts, list) or not 1 <= len(texts) <= 10_000:
            raise ControlError(400, "'texts' must be a list of 1-10000 strings")
        texts = [_text(t) for t in texts]
        interval = _int(body, "interval_ms", 50, 0, 60_000) / 1000
        r = line.reader(body)
        written = []
        start = time.monotonic()
        for i, t in enumerate(texts):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            written.append(line.scan(r, t))
        return {"written": written}

    def garbage(body: dict[str, Any]) -> dict[str, Any]:
        r = line.reader(body)
        return {"written": line.garbage(r, _int(body, "length", 32, 1, 100_000))}

    def overlong(body: dict[str, Any]) -> dict[str, Any]:
        r = line.reader(body)
        n = _int(body, "length", 600, 1, 1_000_000)
        return {"written": line._write(r.prefix() + b"A" * n)}

    def raw(body: dict[str, Any]) -> dict[str, Any]:
        try:
            data = bytes.fromhex(str(body.get("hex", "")))
        except ValueError:
            raise ControlError(400, "'hex' must be hexadecimal bytes") from None
        assert line._transport is not None
        now = time.monotonic()
        line._transport.write(data)
        line.bytes_out += len(data)
        return {"written": now}

    def offline(body: dict[str, Any]) -> dict[str, Any]:
        on = body.get("on", True)
        if not isinstance(on, bool):
            raise ControlError(400, "'on' must be true or false")
        targets = [line.reader(body)] if "reader" in body else list(line.readers.values())
        for r in targets:
            r.offline = on
        return {}

    app.router.add_get("/state", state)
    route("/scan", scan)
    route("/scans", scans)
    route("/garbage", garbage)
    route("/overlong", overlong)
    route("/raw", raw)
    route("/offline", offline)
    return app


def _addresses(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        try:
            a = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad address list {text!r}") from None
        if not 0 <= a <= 255:
            raise argparse.ArgumentTypeError(f"addresses are 0-255, not {a}")
        out.append(a)
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"duplicate address in {text!r}")
    return out


async def run(addresses: Sequence[int | None], terminator: bytes, control: tuple[str, int]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    line = ReaderLine(addresses, terminator)
    runner: web.AppRunner | None = None
    try:
        path = line.start()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(control)
        runner = web.AppRunner(make_app(line), access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()[:2]
        ready = {
            "ready": True,
            "serial": path,
            "control": f"http://{host}:{port}",
            "pid": os.getpid(),
            "readers": list(addresses),
        }
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        if runner is not None:
            await runner.cleanup()
        line.stop()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m firmware_stubs.qr_reader", description="QR reader firmware stub")
    ap.add_argument(
        "--pty", action="store_true", required=True, help="serve on a new pseudo-terminal (the only transport)"
    )
    ap.add_argument(
        "--addresses",
        type=_addresses,
        default=None,
        help="addressed readers on one RS-485 line, e.g. 1,2 (default: one unaddressed reader)",
    )
    ap.add_argument("--terminator", choices=sorted(TERMINATORS), default="cr", help="line ending (default cr)")
    ap.add_argument("--control", type=parse_hostport, default=("127.0.0.1", 0), metavar="HOST:PORT")
    args = ap.parse_args(argv)
    addresses: list[int | None] = list(args.addresses) if args.addresses else [None]
    asyncio.run(run(addresses, TERMINATORS[args.terminator], args.control))


if __name__ == "__main__":
    main()
