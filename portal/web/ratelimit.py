"""Token buckets per key (a client address, a phone number, a house), on an injectable monotonic clock,
and the client address they key on when the portal sits behind a reverse proxy.

Memory is bounded: past ``max_keys`` the least recently used keys are forgotten (a forgotten key
starts with a full bucket again, which only ever errs towards letting a person in).

The pages use a :class:`Limiter`: :class:`MemoryLimiter` (one instance: the buckets above) or, when several portal
instances share the store, :class:`SharedLimiter`, the same buckets kept in the store's ``limit_buckets`` rows
(wall-clock seconds; each take is one write transaction, so a limit holds whichever instance a request reaches).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from portal.store import Conn, Store


def bucket_level(capacity: float, refill: float, tokens: float, at: float, now: float) -> float:
    """The tokens in a bucket at ``now`` that held ``tokens`` at ``at`` (a clock that went back refills nothing)."""
    return min(capacity, tokens + max(0.0, now - at) * refill)


class RateLimiter:
    def __init__(
        self,
        rate: float,
        per_s: float,
        *,
        burst: float | None = None,
        max_keys: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or per_s <= 0:
            raise ValueError("rate and per_s must be positive")
        self.capacity = float(burst if burst is not None else rate)
        self.refill = rate / per_s  # tokens a second
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key → (tokens, at)

    def _level(self, key: str) -> float:
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.capacity, now))
        return bucket_level(self.capacity, self.refill, tokens, at, now)

    def allow(self, key: str, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are that many."""
        level = self._level(key)
        ok = level >= cost
        self._put(key, level - cost if ok else level)
        return ok

    def blocked(self, key: str) -> bool:
        """True while the bucket is empty (without taking anything)."""
        return self._level(key) < 1.0

    def spend(self, key: str, cost: float = 1.0) -> None:
        """Take tokens whether or not there are enough (failures count even when already throttled)."""
        self._put(key, max(-self.capacity, self._level(key) - cost))

    def _put(self, key: str, tokens: float) -> None:
        self._buckets[key] = (tokens, self.clock())
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


class Limiter(Protocol):
    async def allow(self, key: str, cost: float = 1.0) -> bool: ...
    async def blocked(self, key: str) -> bool: ...
    async def spend(self, key: str, cost: float = 1.0) -> None: ...


class MemoryLimiter:
    """A :class:`RateLimiter` of this process (one portal instance)."""

    def __init__(self, buckets: RateLimiter) -> None:
        self.buckets = buckets

    async def allow(self, key: str, cost: float = 1.0) -> bool:
        return self.buckets.allow(key, cost)

    async def blocked(self, key: str) -> bool:
        return self.buckets.blocked(key)

    async def spend(self, key: str, cost: float = 1.0) -> None:
        self.buckets.spend(key, cost)


class SharedLimiter:
    """The buckets of :class:`RateLimiter` as rows of the store (``name``, key), for instances that share it.

    A bucket row untouched long enough to be full again means the same as no row: the portal's housekeeping deletes
    them (portal.web.auth.forget_stale_limits).
    """

    def __init__(
        self,
        store: Store,
        name: str,
        rate: float,
        per_s: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if rate <= 0 or per_s <= 0:
            raise ValueError("rate and per_s must be positive")
        self.store, self.name, self.clock = store, name, clock
        self.capacity = float(burst if burst is not None else rate)
        self.refill = rate / per_s

    def _level(self, conn: Conn, key: str, now: float) -> float:
        row = conn.execute(
            "SELECT tokens, at FROM limit_buckets WHERE name = ? AND key = ?", (self.name, key)
        ).fetchone()
        return self.capacity if row is None else bucket_level(self.capacity, self.refill, row[0], row[1], now)

    def _put(self, conn: Conn, key: str, tokens: float, now: float) -> None:
        conn.execute(
            "INSERT INTO limit_buckets (name, key, tokens, at) VALUES (?, ?, ?, ?) ON CONFLICT (name, key)"
            " DO UPDATE SET tokens = excluded.tokens, at = excluded.at",
            (self.name, key, tokens, now),
        )

    async def allow(self, key: str, cost: float = 1.0) -> bool:
        def take(conn: Conn) -> bool:
            now = self.clock()
            level = self._level(conn, key, now)
            ok = level >= cost
            self._put(conn, key, level - cost if ok else level, now)
            return ok

        ok: bool = await self.store.run_write(take)
        return ok

    async def blocked(self, key: str) -> bool:
        level: float = await self.store.read(lambda c: self._level(c, key, self.clock()))
        return level < 1.0

    async def spend(self, key: str, cost: float = 1.0) -> None:
        def take(conn: Conn) -> None:
            now = self.clock()
            self._put(conn, key, max(-self.capacity, self._level(conn, key, now) - cost), now)

        await self.store.run_write(take)


def limiter(
    store: Store,
    name: str,
    rate: float,
    per_s: float,
    *,
    clock: Callable[[], float],
    wall: Callable[[], float] = time.time,
    **kw: Any,
) -> Limiter:
    """The limiter for the store: shared rows when instances share it (on the ``wall`` clock), else this process's
    buckets (on ``clock``, monotonic)."""
    if store.shared:
        return SharedLimiter(store, name, rate, per_s, clock=wall, **kw)
    return MemoryLimiter(RateLimiter(rate, per_s, clock=clock, **kw))


# ---------------------------------------------------------------- the client behind a reverse proxy

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """Parse CIDRs ("10.0.0.0/8", "::1", "127.0.0.1"); raises ValueError naming a bad one."""
    return tuple(ipaddress.ip_network(c.strip(), strict=True) for c in cidrs)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:51234"
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]) -> str | None:
    """The address a request really came from.

    ``peer`` is the direct peer of the connection. Only when it is one of the ``trusted`` proxies is
    X-Forwarded-For (``forwarded_for``: every such header, in order) believed, and then only from the
    right: each proxy appends the address it saw, so the right-most address that is not a trusted proxy
    is the client; whatever a client wrote further left is ignored. An unreadable hop ends the walk at
    the last proxy that could be believed.
    """
    ip = _ip(peer) if peer else None
    if ip is None or not any(ip in n for n in trusted):
        return peer
    current = str(ip)
    hops = [h for header in forwarded_for for h in header.split(",")]
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:
            break
        current = str(ip)
        if not any(ip in n for n in trusted):
            break
    return current


def real_client(trusted_proxies: Iterable[str]) -> Middleware:
    """An aiohttp middleware (put it first) giving handlers ``request.remote`` = :func:`client_address`.

    With no trusted proxies it is a no-op and X-Forwarded-For is never read.
    """
    trusted = networks(trusted_proxies)

    @web.middleware
    async def real_client_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if trusted:
            remote = client_address(request.remote, request.headers.getall("X-Forwarded-For", ()), trusted)
            if remote is not None and remote != request.remote:
                request = request.clone(remote=remote)
        return await handler(request)

    return real_client_middleware
