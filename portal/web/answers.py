"""Reading the answers of the HTTP services the portal calls (the grid platform, the notification webhooks): whole,
however many pieces they arrive in, and never more than the caller's cap."""

from __future__ import annotations

import aiohttp


async def read_answer(r: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """The whole body of ``r``; None when it is longer than ``cap`` bytes (by its Content-Length, or found while
    reading). ``r.content.read(n)`` alone answers only what has arrived so far."""
    if r.content_length is not None and r.content_length > cap:
        return None
    buf = bytearray()
    while chunk := await r.content.read(cap + 1 - len(buf)):
        buf += chunk
        if len(buf) > cap:
            return None
    return bytes(buf)
