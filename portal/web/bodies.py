"""Reading a request's body: every handler reads forms, JSON and multipart streams through here, so a body the
client got wrong is a 400 said where it is read, and any other error stays a 500 (a bug of ours).

- :func:`read_json`: a JSON object, else a 400 that says what is wrong (``bad_request``).
- :func:`read_form`: the urlencoded or multipart form, else :class:`MalformedBody`.
- :func:`read_bytes`: the raw body (the caller parses it and says what is wrong), else :class:`MalformedBody`.
- :func:`reading_body`: around code that streams a body (multipart part by part, or in chunks).

:class:`MalformedBody` is answered by the portal's error middleware (portal.app) with a plain 400 ("malformed
body"), JSON under /api/. Size caps are portal.web.limits' (a 413).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from multidict import MultiDictProxy


class MalformedBody(Exception):
    """The request's body is not what it claims to be (bad encoding, broken multipart): the client's fault."""


def bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": "bad-request", "detail": message}), content_type="application/json"
    )


@contextmanager
def reading_body() -> Iterator[None]:
    """Around code that only reads the body: what aiohttp's parsers refuse there (text not in its claimed encoding,
    a broken multipart part, a part header the parser rejects) becomes :class:`MalformedBody`."""
    try:
        yield
    except (ValueError, BadHttpMessage) as e:  # UnicodeDecodeError is a ValueError
        raise MalformedBody(getattr(e, "message", None) or str(e)) from e


async def read_form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """The request's form (urlencoded or multipart; empty for another content type), read once and cached."""
    with reading_body():
        return await request.post()


async def read_bytes(request: web.Request) -> bytes:
    """The whole body as it came (a chunked body the parser refuses mid-way is :class:`MalformedBody`)."""
    with reading_body():
        return await request.read()


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 (413 when over the size cap)."""
    if request.content_type != "application/json":
        raise bad_request("expected Content-Type: application/json")
    raw = await read_bytes(request)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"malformed JSON: {e}") from None
    except RecursionError:  # thousands of nested brackets
        raise bad_request("malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request("expected a JSON object")
    return data
