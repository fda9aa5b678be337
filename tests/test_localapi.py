"""The local API's own HTTP/1.1 server: request parsing from byte tables, then the server on a real
loopback socket with its edge cases (malformed requests, oversized heads, wrong methods, slow and
silent clients, a full house, failing routes), real clients (urllib as `gatehouse status` uses,
aiohttp as a scraper would), the latency histogram, and what the daemon imports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.localapi import (
    LATENCY_BUCKETS,
    MAX_HEAD_BYTES,
    MAX_HEADER_FIELDS,
    EventLatency,
    HttpError,
    LocalHttpServer,
    parse_head,
    parse_request_line,
    read_head,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]
READ_TIMEOUT = 0.3
HANDLER_TIMEOUT = 0.3
MAX_CONNS = 4
STATUS_BODY = json.dumps({"site": "estate-a", "ready": True}).encode()


# ---------------------------------------------------------------- parsing, from bytes


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"GET /status HTTP/1.1", ("GET", "/status", "", "HTTP/1.1")),
        (b"GET /metrics?name[]=up&x=1 HTTP/1.0", ("GET", "/metrics", "name[]=up&x=1", "HTTP/1.0")),
        (b"HEAD /status HTTP/1.1", ("HEAD", "/status", "", "HTTP/1.1")),
        (b"GET http://127.0.0.1:9880/status?x=1 HTTP/1.1", ("GET", "/status", "x=1", "HTTP/1.1")),
        (b"GET HTTP://localhost HTTP/1.1", ("GET", "/", "", "HTTP/1.1")),
        (b"OPTIONS * HTTP/1.1", ("OPTIONS", "*", "", "HTTP/1.1")),
        (b"PROPFIND / HTTP/1.1", ("PROPFIND", "/", "", "HTTP/1.1")),
    ],
)
def test_request_lines_understood(line: bytes, expected: tuple[str, str, str, str]) -> None:
    assert parse_request_line(line) == expected


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"", 400),
        (b"GET", 400),
        (b"GET /status", 400),
        (b"GET  /status HTTP/1.1", 400),  # two spaces
        (b" GET /status HTTP/1.1", 400),
        (b"GET /status HTTP/1.1 extra", 400),
        (b"GET\t/status\tHTTP/1.1", 400),
        (b"G(T /status HTTP/1.1", 400),
        (b"GET status HTTP/1.1", 400),
        (b"GET /st\xe4tus HTTP/1.1", 400),  # 8-bit byte in the target
        (b"GET /sta\x00tus HTTP/1.1", 400),
        (b"GET /status HTTP/1.1\r", 400),  # a stray CR left over
        (b"GET /status http/1.1", 400),
        (b"GET /status HTTP/11", 400),
        (b"GET /status HTTP/1.10", 400),
        (b"GET ftp://host/status HTTP/1.1", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS client hello on the plain port
        (b"GET /status HTTP/2.0", 505),
        (b"GET /status HTTP/0.9", 505),
    ],
)
def test_request_lines_refused(line: bytes, status: int) -> None:
    with pytest.raises(HttpError) as e:
        parse_request_line(line)
    assert e.value.status == status


def test_headers_lower_cased_and_repeats_joined() -> None:
    req = parse_head(
        [
            b"GET /status HTTP/1.1",
            b"Host: 127.0.0.1:9880",
            b"Accept: text/plain",
            b"ACCEPT:  application/json \t",
            b"X-Empty:",
        ]
    )
    assert (req.method, req.path, req.version) == ("GET", "/status", "HTTP/1.1")
    assert dict(req.headers) == {"host": "127.0.0.1:9880", "accept": "text/plain, application/json", "x-empty": ""}
    assert not req.has_body


@pytest.mark.parametrize(
    "lines",
    [
        [],
        [b"GET /status HTTP/1.1"],  # HTTP/1.1 needs a Host
        [b"GET /status HTTP/1.1", b"Host: a", b" folded: continuation"],
        [b"GET /status HTTP/1.1", b"Host: a", b"\tfolded"],
        [b"GET /status HTTP/1.1", b"Host : a"],
        [b"GET /status HTTP/1.1", b"Host: a", b"NoColonHere"],
        [b"GET /status HTTP/1.1", b"Host: a", b": no name"],
        [b"GET /status HTTP/1.1", b"Ho\xffst: a"],
        [b"GET /status HTTP/1.1", b"Host: a", b"X-Bad: a\x00b"],
        [b"GET /status HTTP/1.1", b"Host: a", b"X-Bad: a\rb"],
        [b"GET /status HTTP/1.1", b"Host: a", b"Host: b"],
        [b"GET /status HTTP/1.1", b"Host: a", b"Content-Length: 0", b"Content-Length: 0"],
        [b"GET /status HTTP/1.1", b"Host: a", b"Content-Length: -1"],
        [b"GET /status HTTP/1.1", b"Host: a", b"Content-Length: 1e3"],
        [b"GET /status HTTP/1.1", b"Host: a", b"Content-Length: 5 5"],
        [b"GET /status HTTP/1.1", b"Host: a", "Content-Length: ٣".encode()],  # a digit, but not an ASCII one
    ],
)
def test_heads_refused_with_400(lines: list[bytes]) -> None:
    with pytest.raises(HttpError) as e:
        parse_head(lines)
    assert e.value.status == 400


def test_http_1_0_needs_no_host() -> None:
    assert parse_head([b"GET /metrics HTTP/1.0"]).path == "/metrics"


@pytest.mark.parametrize(
    ("fields", "has_body"),
    [
        ([], False),
        ([b"Content-Length: 0"], False),
        ([b"Content-Length: 000"], False),
        ([b"Content-Length: 5"], True),
        ([b"Content-Length: 99999999999999999999999999999"], True),
        ([b"Transfer-Encoding: chunked"], True),
    ],
)
def test_has_body(fields: list[bytes], has_body: bool) -> None:
    assert parse_head([b"POST /status HTTP/1.1", b"Host: a", *fields]).has_body is has_body


async def head_of(data: bytes, *, eof: bool = True) -> list[bytes] | None:
    reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES)
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return await read_head(reader)


async def test_read_head_crlf_lf_and_nothing() -> None:
    assert await head_of(b"GET /status HTTP/1.1\r\nHost: a\r\n\r\nignored body") == [
        b"GET /status HTTP/1.1",
        b"Host: a",
    ]
    assert await head_of(b"GET /status HTTP/1.0\n\n") == [b"GET /status HTTP/1.0"]
    assert await head_of(b"") is None


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /status HTTP/1.1\r\nHost: a\r\n", 400),  # the peer stopped before the blank line
        (b"GET /sta", 400),
        (b"\r\n", 400),
        (b"GET /" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /" + b"a" * (2 * MAX_HEAD_BYTES) + b" HTTP/1.1", 414),  # no newline in sight either
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * MAX_HEAD_BYTES + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X-A: 1234567890\r\n" * (MAX_HEAD_BYTES // 17 + 1) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * (MAX_HEADER_FIELDS + 1) + b"\r\n", 431),
    ],
)
async def test_read_head_refuses(data: bytes, status: int) -> None:
    with pytest.raises(HttpError) as e:
        await head_of(data)
    assert e.value.status == status


async def test_read_head_accepts_the_most_fields_allowed() -> None:
    lines = await head_of(b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * MAX_HEADER_FIELDS + b"\r\n")
    assert lines is not None and len(lines) == MAX_HEADER_FIELDS + 1


# ---------------------------------------------------------------- the server on a loopback socket


class Routes:
    def __init__(self) -> None:
        self.calls = 0
        self.never = asyncio.Event()

    async def status(self) -> tuple[bytes, str]:
        self.calls += 1
        return STATUS_BODY, "application/json; charset=utf-8"

    async def broken(self) -> tuple[bytes, str]:
        raise RuntimeError("the store is on fire")

    async def stuck(self) -> tuple[bytes, str]:
        await self.never.wait()
        return b"", "text/plain"


@pytest.fixture
async def routes() -> Routes:
    return Routes()


@pytest.fixture
async def server(routes: Routes) -> AsyncIterator[LocalHttpServer]:
    srv = LocalHttpServer(
        {"/status": routes.status, "/broken": routes.broken, "/stuck": routes.stuck},
        name="test.local_api",
        read_timeout_s=READ_TIMEOUT,
        handler_timeout_s=HANDLER_TIMEOUT,
        write_timeout_s=2.0,
        max_connections=MAX_CONNS,
    )
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.close()
        assert srv.connections == 0


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:200]!r}"
    status_line, *fields = head.decode("latin-1").split("\r\n")
    version, code, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for f in fields:
        name, _, value = f.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(code), headers, body


async def exchange(port: int, data: bytes, *, eof: bool = False, timeout: float = 5.0) -> bytes:
    """Send ``data`` and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if eof:
            writer.write_eof()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def port_of(srv: LocalHttpServer) -> int:
    assert srv.port is not None
    return srv.port


async def test_get_answers_with_length_and_close(server: LocalHttpServer, routes: Routes) -> None:
    code, headers, body = split_response(
        await exchange(port_of(server), b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
    )
    assert (code, body) == (200, STATUS_BODY)
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["content-length"] == str(len(STATUS_BODY))
    assert headers["connection"] == "close"
    assert routes.calls == 1 and server.responses == {200: 1}


async def test_head_has_the_length_but_no_body(server: LocalHttpServer) -> None:
    code, headers, body = split_response(await exchange(port_of(server), b"HEAD /status HTTP/1.0\r\n\r\n"))
    assert (code, body) == (200, b"")
    assert headers["content-length"] == str(len(STATUS_BODY))


async def test_query_and_absolute_form_reach_the_route(server: LocalHttpServer) -> None:
    for target in (b"/status?format=json", b"http://127.0.0.1/status"):
        code, _, body = split_response(
            await exchange(port_of(server), b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        )
        assert (code, body) == (200, STATUS_BODY)


@pytest.mark.parametrize(
    "request_line",
    [
        b"GARBAGE",
        b"GET /status",
        b"GET /status HTTP/1.1 x",
        b"GET /st\xfctus HTTP/1.1",
        b"\x16\x03\x01\x00\xa5\x01",
    ],
)
async def test_malformed_request_line_gets_400(server: LocalHttpServer, routes: Routes, request_line: bytes) -> None:
    code, headers, body = split_response(await exchange(port_of(server), request_line + b"\r\nHost: a\r\n\r\n"))
    assert code == 400
    assert headers["content-type"].startswith("text/plain") and body.startswith(b"400 Bad Request: ")
    assert routes.calls == 0 and server.responses == {400: 1}


async def test_missing_host_and_bad_header_get_400(server: LocalHttpServer) -> None:
    for head in (b"GET /status HTTP/1.1\r\n\r\n", b"GET /status HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"):
        code, _, _ = split_response(await exchange(port_of(server), head))
        assert code == 400
    assert server.responses == {400: 2}


async def test_other_http_versions_get_505(server: LocalHttpServer) -> None:
    code, _, _ = split_response(await exchange(port_of(server), b"GET /status HTTP/2.0\r\n\r\n"))
    assert code == 505


async def test_oversized_headers_get_431_and_the_client_reads_it(server: LocalHttpServer) -> None:
    big = b"GET /status HTTP/1.1\r\nHost: a\r\n"
    big += b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 200) for i in range(60)) + b"\r\n"
    assert len(big) > MAX_HEAD_BYTES
    code, _, body = split_response(await exchange(port_of(server), big))
    assert code == 431 and b"too large" in body


async def test_a_huge_request_line_gets_414(server: LocalHttpServer) -> None:
    code, _, _ = split_response(
        await exchange(port_of(server), b"GET /" + b"a" * (3 * MAX_HEAD_BYTES) + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    )
    assert code == 414


async def test_wrong_method_gets_405_with_allow(server: LocalHttpServer, routes: Routes) -> None:
    body = b"x" * 20_000  # a body the server never reads: the client still sees the answer
    code, headers, _ = split_response(
        await exchange(
            port_of(server), b"POST /status HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
    )
    assert code == 405 and headers["allow"] == "GET, HEAD"
    for method in (b"DELETE", b"PUT", b"OPTIONS"):
        code, _, _ = split_response(await exchange(port_of(server), method + b" /status HTTP/1.1\r\nHost: a\r\n\r\n"))
        assert code == 405
    assert routes.calls == 0 and server.responses == {405: 4}


async def test_unknown_path_gets_404(server: LocalHttpServer) -> None:
    for target in (b"/", b"/status/", b"/STATUS", b"/metrics", b"*"):
        raw = await exchange(port_of(server), b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        code, _, body = split_response(raw)
        assert code == 404 and b"/status" in body
    assert server.responses == {404: 5}


async def test_get_with_a_body_gets_400(server: LocalHttpServer, routes: Routes) -> None:
    for extra in (b"Content-Length: 5\r\n\r\nhello", b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"):
        code, _, _ = split_response(await exchange(port_of(server), b"GET /status HTTP/1.1\r\nHost: a\r\n" + extra))
        assert code == 400
    assert routes.calls == 0


@pytest.mark.realtime
async def test_slow_client_gets_408_at_the_deadline(server: LocalHttpServer) -> None:
    t0 = time.monotonic()
    code, _, _ = split_response(await exchange(port_of(server), b"GET /status HTTP/1.1\r\nHo"))
    took = time.monotonic() - t0
    assert code == 408
    assert READ_TIMEOUT * 0.9 <= took < READ_TIMEOUT + 2
    assert server.responses == {408: 1}


async def test_dripping_client_gets_408_at_the_deadline_too(server: LocalHttpServer) -> None:
    """The deadline covers the whole head, not each read: a byte now and then does not keep it open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))

    async def drip() -> None:
        for b in b"GET /status HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 1000:
            writer.write(bytes([b]))
            await asyncio.sleep(READ_TIMEOUT / 10)

    dripper = asyncio.create_task(drip())
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(READ_TIMEOUT + 3):
            raw = await reader.read()
    finally:
        dripper.cancel()
        try:
            await dripper
        except (asyncio.CancelledError, OSError):
            pass
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    assert split_response(raw)[0] == 408
    assert time.monotonic() - t0 < READ_TIMEOUT + 2


async def test_silent_peer_is_dropped_without_an_answer(server: LocalHttpServer) -> None:
    assert await exchange(port_of(server), b"", eof=True) == b""
    await wait_for(lambda: server.connections == 0, 5, "the connection to end")
    assert server.responses == {}


async def test_failing_route_gets_500_and_the_server_goes_on(server: LocalHttpServer) -> None:
    code, _, body = split_response(await exchange(port_of(server), b"GET /broken HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert code == 500 and b"fire" not in body  # the detail goes to the log, not to the client
    code, _, _ = split_response(await exchange(port_of(server), b"GET /status HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert code == 200


async def test_stuck_route_gets_503_after_its_deadline(server: LocalHttpServer) -> None:
    t0 = time.monotonic()
    code, _, _ = split_response(await exchange(port_of(server), b"GET /stuck HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert code == 503 and HANDLER_TIMEOUT * 0.9 <= time.monotonic() - t0 < HANDLER_TIMEOUT + 2


async def test_connections_past_the_limit_get_503_at_once(server: LocalHttpServer) -> None:
    idle = [await asyncio.open_connection("127.0.0.1", port_of(server)) for _ in range(MAX_CONNS)]
    try:
        await wait_for(lambda: server.connections == MAX_CONNS, 5, "the idle connections to be accepted")
        t0 = time.monotonic()
        code, _, _ = split_response(await exchange(port_of(server), b"GET /status HTTP/1.1\r\nHost: a\r\n\r\n"))
        assert code == 503 and time.monotonic() - t0 < READ_TIMEOUT
        for reader, _ in idle:  # each idle one is timed out in turn and the house empties
            async with asyncio.timeout(READ_TIMEOUT + 3):
                assert split_response(await reader.read())[0] == 408
    finally:
        for _, writer in idle:
            writer.close()
    await wait_for(lambda: server.connections == 0, 5, "the connections to end")
    code, _, _ = split_response(await exchange(port_of(server), b"GET /status HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert code == 200


async def test_close_ends_open_connections(server: LocalHttpServer) -> None:
    port = port_of(server)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /status HTTP/1.1\r\n")
        await writer.drain()
        await wait_for(lambda: server.connections == 1, 5, "the connection to be accepted")
        async with asyncio.timeout(2):
            await server.close()
        assert server.connections == 0 and server.port is None
        async with asyncio.timeout(2):
            try:
                assert await reader.read() == b""
            except ConnectionResetError:
                pass
        with pytest.raises(OSError):  # no longer listening
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


async def test_a_taken_port_is_an_oserror(server: LocalHttpServer, routes: Routes) -> None:
    other = LocalHttpServer({"/status": routes.status})
    with pytest.raises(OSError):
        await other.start("127.0.0.1", port_of(server))
    await other.close()


async def test_real_clients(server: LocalHttpServer) -> None:
    url = f"http://127.0.0.1:{port_of(server)}/status"

    def with_urllib() -> tuple[int, bytes]:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()

    assert await asyncio.to_thread(with_urllib) == (200, STATUS_BODY)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):  # the client's pool must notice each connection closing
            async with http.get(url) as r:
                assert r.status == 200 and await r.json() == json.loads(STATUS_BODY)
        async with http.post(url, data=b"x") as r:
            assert r.status == 405
    assert server.responses == {200: 4, 405: 1}


# ---------------------------------------------------------------- the latency histogram


def test_latency_buckets_are_inclusive_upper_bounds() -> None:
    lat = EventLatency(wall=lambda: 1700000000.0)
    for s in (0.0, 0.005, 0.0051, 0.3, 300.0, 301.0):
        lat.stored(s)
    for bad in (-0.1, math.nan, math.inf):
        lat.stored(bad)
    lat.acked(0.01)
    counts = dict(zip((*LATENCY_BUCKETS, math.inf), lat.cumulative("stored"), strict=True))
    assert counts[0.005] == 2 and counts[0.01] == 3 and counts[0.25] == 3 and counts[0.5] == 4
    assert counts[300.0] == 5 and counts[math.inf] == 6
    assert lat.cumulative("acked")[LATENCY_BUCKETS.index(0.01)] == 1


def test_latency_histogram_in_prometheus_text() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    lat = EventLatency(wall=lambda: 1700000000.0)
    lat.stored(0.012)
    lat.stored(0.02)
    lat.acked(2.0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(lat)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(generate_latest(registry).decode())
        for s in fam.samples
    }
    name = "gatehouse_event_latency_seconds"
    assert samples[(f"{name}_bucket", (("le", "0.01"), ("stage", "stored")))] == 0
    assert samples[(f"{name}_bucket", (("le", "0.025"), ("stage", "stored")))] == 2
    assert samples[(f"{name}_bucket", (("le", "+Inf"), ("stage", "acked")))] == 1
    assert samples[(f"{name}_count", (("stage", "stored"),))] == 2
    assert samples[(f"{name}_sum", (("stage", "stored"),))] == pytest.approx(0.032)
    assert samples[(f"{name}_created", (("stage", "acked"),))] == 1700000000.0


# ---------------------------------------------------------------- what the daemon loads


def test_the_daemon_imports_no_web_framework_metrics_library_or_crypto() -> None:
    """aiohttp costs the gateway ~10 MB resident, prometheus_client ~1 MB until the first scrape, and
    cryptography (for passes and signed commands) ~7 MB where no door or reader is configured, until the first
    command: none of them at start-up."""
    code = (
        "import json, sys; import gateway.cli, gateway.app; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True
    ).stdout
    loaded = set(json.loads(out))
    assert "gateway" in loaded and "devices" in loaded
    assert not loaded & {"aiohttp", "prometheus_client", "cryptography"}, sorted(loaded)


async def test_an_answer_to_a_bad_request_reaches_a_peer_still_sending(server: LocalHttpServer) -> None:
    """A peer that sends a bad head and keeps sending: the server answers 400 and closes with bytes unread. Closed
    at once, the kernel would answer those bytes with a reset that destroys the answer before the peer reads it; the
    server half-closes and drops what still comes for a moment, so the 400 arrives."""
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        try:
            writer.write(b"NOT HTTP AT ALL\r\n" + b"x" * 4096)

            async def keep_sending(writer: asyncio.StreamWriter) -> None:
                for _ in range(50):
                    writer.write(b"y" * 65536)
                    await asyncio.sleep(0)

            sender = asyncio.create_task(keep_sending(writer))
            try:
                async with asyncio.timeout(5):
                    raw = await reader.read()
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await sender
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        assert split_response(raw)[0] in (400, 431)  # the first line, or the head too long: said either way
