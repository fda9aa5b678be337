"""Request body caps per route, and the check that aiohttp parses HTTP with its compiled parser.

Every route accepts at most :data:`DEFAULT_LIMIT` bytes of body (or ``max_body_bytes`` from the config when
that is lower) unless it is marked with :func:`body_limit`. The middleware refuses a declared Content-Length
over the cap before a byte of the body is read; a chunked (or compressed) body is counted as it is read —
through ``request.read()``/``post()``/``json()`` and through ``request.content``/``multipart()`` alike — and
refused once past the cap. Refusals are a short JSON object for the API and a short page otherwise, with the
connection closed after them so the rest of an oversized upload is not read.
"""

from __future__ import annotations

import codecs
import html
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web, web_protocol
from aiohttp.helpers import parse_mimetype
from aiohttp.streams import AsyncStreamIterator, ChunkTupleAsyncStreamIterator, EmptyStreamReader, StreamReader

from common.configfile import ConfigError
from portal.config import PortalConfig
from portal.web.auth import wants_json

log = logging.getLogger("portal.limits")

DEFAULT_LIMIT = 8 * 1024  # forms and JSON commands are a few hundred bytes; 8 KiB leaves room for long notes
LIMIT_ATTR = "__portal_body_limit__"

H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])
Limit = int | Callable[[PortalConfig], int]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def body_limit(limit: Limit) -> Callable[[H], H]:
    """Mark a handler with its own body cap in bytes, or a function of the config giving it."""
    if isinstance(limit, int) and limit < 0:
        raise ValueError("a body limit is a byte count >= 0")

    def deco(handler: H) -> H:
        setattr(handler, LIMIT_ATTR, limit)
        return handler

    return deco


def limit_of(handler: Any, cfg: PortalConfig) -> int:
    mark: Limit | None = getattr(handler, LIMIT_ATTR, None)
    if mark is None:
        return min(DEFAULT_LIMIT, cfg.max_body_bytes)
    return int(mark(cfg)) if callable(mark) else mark


def refuse(request: web.Request, status: int, body: dict[str, Any], zh: str, en: str) -> web.Response:
    """A refusal as JSON for the API, a short page otherwise; the connection closes after it."""
    if wants_json(request):
        resp: web.Response = web.json_response(body, status=status)
    else:
        resp = web.Response(
            status=status,
            content_type="text/html",
            charset="utf-8",
            text=(
                f'<!doctype html><html lang="zh-CN"><meta charset="utf-8"><title>{status}</title>'
                f"<p>{html.escape(zh)}<br>{html.escape(en)}</p></html>\n"
            ),
        )
    resp.force_close()
    return resp


def refusal(request: web.Request, limit: int) -> web.Response:
    return refuse(
        request,
        413,
        {"error": "too-large", "max_bytes": limit},
        f"请求内容过大（最多 {limit} 字节）。",
        f"Request body too large (at most {limit} bytes).",
    )


class CappedReader:
    """A request body stream that raises 413 once more than ``limit`` bytes have arrived.

    Counts what the parser fed (after any Content-Encoding was undone), so a small gzip bomb is caught
    too. Everything that is not a read is passed through to the real stream.
    """

    def __init__(self, inner: StreamReader, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _check(self) -> None:
        if self._inner.total_bytes > self._limit:
            raise web.HTTPRequestEntityTooLarge(max_size=self._limit, actual_size=self._inner.total_bytes)

    async def read(self, n: int = -1) -> bytes:
        data = await self._inner.read(n)
        self._check()
        return data

    async def readany(self) -> bytes:
        data = await self._inner.readany()
        self._check()
        return data

    async def readchunk(self) -> tuple[bytes, bool]:
        got = await self._inner.readchunk()
        self._check()
        return got

    async def readline(self, *, max_line_length: int | None = None) -> bytes:
        data = await self._inner.readline(max_line_length=max_line_length)
        self._check()
        return data

    async def readuntil(self, separator: bytes = b"\n", *, max_size: int | None = None) -> bytes:
        data = await self._inner.readuntil(separator, max_size=max_size)
        self._check()
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await self._inner.readexactly(n)
        self._check()
        return data

    def read_nowait(self, n: int = -1) -> bytes:
        data = self._inner.read_nowait(n)
        self._check()
        return data

    def iter_chunked(self, n: int) -> AsyncStreamIterator[bytes]:
        return AsyncStreamIterator(lambda: self.read(n))

    def iter_any(self) -> AsyncStreamIterator[bytes]:
        return AsyncStreamIterator(self.readany)

    def iter_chunks(self) -> ChunkTupleAsyncStreamIterator:
        return ChunkTupleAsyncStreamIterator(self)  # type: ignore[arg-type]

    def __aiter__(self) -> AsyncIterator[bytes]:
        return AsyncStreamIterator(self.readline)


def middleware(cfg: PortalConfig) -> Any:
    """The body-cap middleware; put it before anything that may read the body (the CSRF check does)."""

    @web.middleware
    async def limit_body(request: web.Request, handler: Handler) -> web.StreamResponse:
        limit = limit_of(request.match_info.handler, cfg)
        declared = request.content_length
        if declared is not None and declared > limit:
            log.info("refused %s %s: body of %d bytes, the limit is %d", request.method, request.path, declared, limit)
            return refusal(request, limit)
        if request.body_exists:
            if request.charset and not _known_codec(request.charset):  # else a LookupError deep in post()
                return refuse(
                    request, 415, {"error": "unsupported-charset"}, "不支持的字符集。", "Unsupported charset."
                )
            if request.content_type.startswith("multipart/") and not _boundary_ok(request):
                return refuse(
                    request,
                    400,
                    {"error": "bad-request", "detail": "multipart needs a boundary"},
                    "请求格式错误。",
                    "Malformed request.",
                )
            # (a clone forgets an earlier clone's remote unless it is passed on: keep the real client)
            remote = request.remote
            request = (
                request.clone(client_max_size=limit)
                if remote is None
                else request.clone(client_max_size=limit, remote=remote)
            )
            if not isinstance(request._payload, EmptyStreamReader | CappedReader):
                request._payload = CappedReader(request._payload, limit)  # type: ignore[assignment]
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            log.info("refused %s %s: body over the limit of %d bytes", request.method, request.path, limit)
            return refusal(request, limit)

    return limit_body


def _boundary_ok(request: web.Request) -> bool:
    """RFC 2046: a multipart body names a boundary of 1 to 70 characters."""
    boundary = parse_mimetype(request.headers.get("Content-Type", "")).parameters.get("boundary", "")
    return 0 < len(boundary) <= 70


def _known_codec(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


# ---------------------------------------------------------------- the HTTP parser


def c_parser_in_use() -> bool:
    """True when the server's request parser is aiohttp's compiled one (llhttp), not the pure-Python fallback."""
    return bool(web_protocol.HttpRequestParser.__module__ == "aiohttp._http_parser")


def require_c_parser() -> None:
    """Refuse to serve with the pure-Python parser: it is slower, and it is where aiohttp's lenient-parsing
    (request smuggling) advisories have landed, on a server that phones reach from outside."""
    if not c_parser_in_use():
        raise ConfigError(
            [
                "aiohttp is using its pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS is set, or the compiled "
                "extension is missing); unset AIOHTTP_NO_EXTENSIONS or reinstall aiohttp from a binary wheel"
            ]
        )
