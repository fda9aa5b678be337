"""Sign-in, server-side sessions, roles and CSRF protection.

Passwords are argon2id hashes at the cost in ``auth`` of the config (hashing runs on a worker thread); a
stored hash of another cost is redone at the user's next sign-in. New passwords need 12 to 1024 characters,
any characters, no composition rules, and must not be the user name. A session is a random 256-bit cookie
value whose SHA-256 is the key in the store, with an idle and an absolute timeout; signing in always issues
a new one. Every route is closed unless marked: :func:`public` opens it to everyone, :func:`roles` narrows
it to some roles, :func:`during_password_change` lets a user who must change the password reach it. Every
state-changing request (and every WebSocket upgrade) must come from an allowed Origin, and a
state-changing request must carry the session's CSRF token (form field ``csrf`` or header
``X-CSRF-Token``); before sign-in a cookie holds that token.

Failed sign-ins lock three kinds of key, each counted over ``failure_window_s`` (defaults in brackets):

* user name + address [10 failures]: someone guessing one account from one place;
* address [20 failures, any names]: a password sprayer trying many accounts;
* user name [30 failures, counted only from addresses where that user never signed in]: one account
  guessed from many places.

A lock lasts ``failure_window_s``, twice that the next time the same key is locked, and so on up to
``lock_max_s``; a key quiet for ``lock_max_s`` after its last lock starts again from the first step. While a
lock holds, even the right password gets the same answer ("try later", HTTP 429 with Retry-After), for real
and unknown names alike (unknown names are counted like real ones, so locks reveal no account). Nobody can
lock a user out of a place where they work: an address where the user has signed in (remembered for 30
days) is exempt from the address and user-name locks and only meets its own name + address lock, which only
failures from that address feed. A success clears its name + address failures, never the address or name
counts (signing in to one's own account does not reset a spray). IPv6 addresses count by /64. The client
address is ``request.remote`` after :func:`portal.web.ratelimit.real_client` (trusted proxies).

The counts live in memory, each table capped (least recently used keys forgotten first), and start empty
after a restart. Every success, failure, lock and first refusal under a lock, sign-out and password change
is an audit row (:mod:`portal.store.audit`), never with the password; an unknown name is kept only as a digest,
since it is often a password typed into the wrong field.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlsplit

from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from common.configfile import write_secret
from portal.config import AuthConfig, PortalConfig
from portal.store import (
    ROLES,
    Conn,
    FnOp,
    Row,
    Session,
    Store,
    StoreConflict,
    User,
    audit,
    count_admins,
    db,
    get_session,
    get_user,
    insert_user,
    now_text,
)
from portal.web.bodies import read_form

log = logging.getLogger("portal.auth")

SESSION_COOKIE = "gh_session"
STATION_COOKIE = "gh_station"  # a guard station's browser (portal/web/stations.py)
PRE_CSRF_COOKIE = "gh_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
# A form with up to three such passwords (sign-in, password change): 4 UTF-8 bytes a character, percent-encoded.
PASSWORD_FORM_BYTES = 3 * 12 * MAX_PASSWORD + 4096
USER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOUCH_EVERY_S = 30.0
FIRST_ADMIN_FILE = "first-admin.password"  # in the data folder, mode 0600, while admin's one-time password holds
KNOWN_ADDRESS_S = 30 * 86400.0  # how long a successful sign-in exempts its address from the wider locks
MAX_KEYS = 10_000  # per lock table and for the known addresses

_NEW_SESSION = "INSERT INTO sessions (id_hash, user_id, csrf_token, created, last_seen) VALUES (?, ?, ?, ?, ?)"
SESSION_KEY = web.RequestKey("portal.session", Session)  # only present when signed in
CSRF_KEY = web.RequestKey("portal.csrf", str)

H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


class AuthError(ValueError):
    """A rejected account operation; ``key`` is an i18n key for the message."""

    def __init__(self, key: str, **kw: object) -> None:
        super().__init__(key)
        self.key = key
        self.kw = kw


# ---------------------------------------------------------------- route marks


@dataclass(frozen=True, slots=True)
class Access:
    public: bool = False
    roles: frozenset[str] | None = None  # None: any signed-in user
    during_password_change: bool = False
    machine: bool = False  # another system's call, authenticated by its own signature in the handler


def _mark(handler: Any, **kw: Any) -> None:
    old: Access = getattr(handler, "__portal_access__", Access())
    handler.__portal_access__ = replace(old, **kw)


def public(handler: H) -> H:
    _mark(handler, public=True)
    return handler


def machine(handler: H) -> H:
    """A route another system calls (the grid platform's status callbacks): no session, no Origin and no CSRF
    token; the handler must authenticate the request itself (a signature over its body) before acting on it."""
    _mark(handler, public=True, machine=True)
    return handler


def roles(*names: str) -> Callable[[H], H]:
    for n in names:
        if n not in ROLES:
            raise ValueError(f"unknown role {n!r}")

    def deco(handler: H) -> H:
        _mark(handler, roles=frozenset(names))
        return handler

    return deco


def during_password_change(handler: H) -> H:
    _mark(handler, during_password_change=True)
    return handler


def access_of(request: web.Request) -> Access:
    if request.path.startswith("/static/"):
        return Access(public=True)
    return getattr(request.match_info.handler, "__portal_access__", Access())


# ---------------------------------------------------------------- the service


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_new_password(password: str, user_name: str = "") -> None:
    """Length only (no composition rules, ASVS 2.1), and not the user name itself."""
    if len(password) < MIN_PASSWORD:
        raise AuthError("password.too_short", n=MIN_PASSWORD)
    if len(password) > MAX_PASSWORD:
        raise AuthError("password.too_long", n=MAX_PASSWORD)
    if user_name and password.strip().casefold() == user_name.casefold():
        raise AuthError("password.is_name")


def password_hasher(cfg: AuthConfig) -> PasswordHasher:
    """argon2id at the configured cost (every tool that stores a staff password should hash with this)."""
    return PasswordHasher(
        time_cost=cfg.argon2_time_cost, memory_cost=cfg.argon2_memory_kib, parallelism=cfg.argon2_parallelism
    )


def address_key(remote: str) -> str:
    """What the address locks count by: the IPv4 address, or the /64 of an IPv6 one (one subscriber's LAN)."""
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


@dataclass(slots=True)
class _Strikes:
    failures: deque[float] = field(default_factory=deque)  # monotonic times within the window
    until: float = 0.0  # locked until (monotonic)
    level: int = 0  # locks so far: the next one lasts window * 2**level
    refused: int = 0  # attempts refused under the current lock


class LockTable:
    """Failures per key in a sliding window, and the locks they lead to (see the module docstring).

    At most ``max_keys`` keys: past that the least recently used is forgotten, which only ever errs
    towards letting someone try again.
    """

    def __init__(
        self, limit: int, window_s: float, lock_max_s: float, clock: Callable[[], float], max_keys: int = MAX_KEYS
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.lock_max_s = lock_max_s
        self.clock = clock
        self.max_keys = max_keys
        self._keys: OrderedDict[str, _Strikes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    # where the strikes are kept: this process's memory (a subclass keeps them in the store)

    def _load(self, key: str) -> _Strikes | None:
        s = self._keys.get(key)
        if s is not None:
            self._keys.move_to_end(key)
        return s

    def _save(self, key: str, s: _Strikes) -> None:
        self._keys[key] = s
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def _drop(self, key: str) -> None:
        self._keys.pop(key, None)

    def _get(self, key: str, now: float) -> _Strikes | None:
        s = self._load(key)
        if s is None:
            return None
        while s.failures and s.failures[0] <= now - self.window_s:
            s.failures.popleft()
        if s.level and s.until <= now - self.lock_max_s:
            s.level = 0  # quiet long enough: forgiven
        if not s.failures and not s.level and s.until <= now:
            self._drop(key)
            return None
        return s

    def lock_left(self, key: str) -> float:
        """Seconds the key stays locked (0: not locked)."""
        now = self.clock()
        s = self._get(key, now)
        return max(0.0, s.until - now) if s is not None else 0.0

    def refuse(self, key: str) -> bool:
        """Count an attempt refused under the lock; True for the first one of this lock."""
        s = self._get(key, self.clock())
        if s is None:
            return False
        s.refused += 1
        self._save(key, s)
        return s.refused == 1

    def fail(self, key: str) -> float:
        """Count a failure; the length of the lock it starts, else 0."""
        now = self.clock()
        s = self._get(key, now) or _Strikes()
        if s.until > now:
            self._save(key, s)
            return 0.0
        s.failures.append(now)
        length = 0.0
        if len(s.failures) >= self.limit:
            length = min(self.window_s * 2.0 ** min(s.level, 30), self.lock_max_s)
            s.until, s.level, s.refused = now + length, s.level + 1, 0
            s.failures.clear()
        self._save(key, s)
        return length

    def clear(self, key: str) -> None:
        """Forget the failures (a lock in force and the doubling stay)."""
        s = self._load(key)
        if s is not None and s.failures:
            s.failures.clear()
            self._save(key, s)


class StoredLockTable(LockTable):
    """A :class:`LockTable` whose strikes are rows of the store (``signin_strikes``), for instances sharing it; made
    for one write transaction (``conn``), on the wall clock."""

    def __init__(
        self,
        conn: Conn,
        kind: str,
        scope: str,
        limit: int,
        window_s: float,
        lock_max_s: float,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(limit, window_s, lock_max_s, clock)
        self.conn, self.kind, self.scope = conn, kind, scope

    def _load(self, key: str) -> _Strikes | None:
        row = self.conn.execute(
            "SELECT failures, locked_until, level, refused FROM signin_strikes"
            " WHERE kind = ? AND scope = ? AND key = ?",
            (self.kind, self.scope, key),
        ).fetchone()
        if row is None:
            return None
        return _Strikes(deque(json.loads(row[0])), float(row[1]), int(row[2]), int(row[3]))

    def _save(self, key: str, s: _Strikes) -> None:
        self.conn.execute(
            "INSERT INTO signin_strikes (kind, scope, key, failures, locked_until, level, refused, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, scope, key) DO UPDATE SET"
            " failures = excluded.failures, locked_until = excluded.locked_until, level = excluded.level,"
            " refused = excluded.refused, at = excluded.at",
            (self.kind, self.scope, key, json.dumps(list(s.failures)), s.until, s.level, s.refused, self.clock()),
        )

    def _drop(self, key: str) -> None:
        self.conn.execute(
            "DELETE FROM signin_strikes WHERE kind = ? AND scope = ? AND key = ?", (self.kind, self.scope, key)
        )


class KnownAddresses:
    """(user name, address) pairs that signed in successfully, for ``ttl_s``; at most ``max_keys`` (LRU)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float], max_keys: int = MAX_KEYS) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_keys = max_keys
        self._at: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, key: str) -> bool:
        at = self._at.get(key)
        if at is None:
            return False
        if at <= self.clock() - self.ttl_s:
            del self._at[key]
            return False
        return True

    def add(self, key: str) -> None:
        self._at[key] = self.clock()
        self._at.move_to_end(key)
        while len(self._at) > self.max_keys:
            self._at.popitem(last=False)


class StoredKnownAddresses:
    """:class:`KnownAddresses` as rows of the store (``signin_known``), for one transaction on the wall clock."""

    def __init__(self, conn: Conn, kind: str, ttl_s: float, clock: Callable[[], float]) -> None:
        self.conn, self.kind, self.ttl_s, self.clock = conn, kind, ttl_s, clock

    def __contains__(self, key: str) -> bool:
        row = self.conn.execute("SELECT at FROM signin_known WHERE kind = ? AND pair = ?", (self.kind, key)).fetchone()
        return row is not None and row[0] > self.clock() - self.ttl_s

    def add(self, key: str) -> None:
        self.conn.execute(
            "INSERT INTO signin_known (kind, pair, at) VALUES (?, ?, ?) ON CONFLICT (kind, pair)"
            " DO UPDATE SET at = excluded.at",
            (self.kind, key, self.clock()),
        )


@dataclass(frozen=True, slots=True)
class Attempt:
    """Who an attempt is about, as the locks see it."""

    name: str  # as typed (capped)
    remote: str
    pair: str
    address: str
    user_key: str
    known: bool  # the account has signed in from this address before


class SignInLocks:
    """The failed-secret locks of one kind of account (see the module docstring): staff user names, and, with a
    table set of its own, residents' phone numbers. Every place that checks a secret of that kind goes through
    one instance: :meth:`check` first, then :meth:`failed` or :meth:`succeeded`."""

    def __init__(
        self,
        cfg: AuthConfig,
        monotonic: Callable[[], float],
        *,
        tables: dict[str, LockTable] | None = None,
        known: KnownAddresses | StoredKnownAddresses | None = None,
    ) -> None:
        self.tables = tables or {
            "user+address": LockTable(
                cfg.max_failures_user_address, cfg.failure_window_s, cfg.lock_max_s, monotonic, max_keys=2 * MAX_KEYS
            ),
            "address": LockTable(cfg.max_failures_address, cfg.failure_window_s, cfg.lock_max_s, monotonic),
            "user": LockTable(cfg.max_failures_user, cfg.failure_window_s, cfg.lock_max_s, monotonic),
        }
        self.known = known if known is not None else KnownAddresses(KNOWN_ADDRESS_S, monotonic)

    def attempt(self, name: str, remote: str) -> Attempt:
        name = name[:64]
        user_key = name.lower()
        address = address_key(remote)
        pair = f"{user_key}|{address}"
        return Attempt(name, remote[:64], pair, address, user_key, pair in self.known)

    def keys(self, at: Attempt) -> list[tuple[str, str]]:
        """The (lock table, key) pairs that apply to an attempt."""
        keys = [("user+address", at.pair)]
        if not at.known:
            keys += [("address", at.address), ("user", at.user_key)]
        return keys

    def check(self, at: Attempt, *, only_pair: bool = False) -> tuple[int, list[str], list[str]]:
        """(seconds until the attempt may be made, 0 when it may; the locked scopes; those refusing it for the
        first time under their lock, for one audit row per lock). ``only_pair``: the user+address lock alone
        (a signed-in user re-entering a secret)."""
        keys = self.keys(at)[:1] if only_pair else self.keys(at)
        left = {scope: self.tables[scope].lock_left(key) for scope, key in keys}
        scopes = [scope for scope, s in left.items() if s > 0]
        first = [scope for scope, key in keys if scope in scopes and self.tables[scope].refuse(key)]
        return (math.ceil(max(left.values())) if scopes else 0), scopes, first

    def failed(self, at: Attempt) -> list[tuple[str, float]]:
        """Count a failure against every key that applies; the locks it started, with their lengths."""
        locks = [(scope, self.tables[scope].fail(key)) for scope, key in self.keys(at)]
        if at.known:  # exempt from the address lock, but its failures still count there
            self.tables["address"].fail(at.address)
        return [(scope, length) for scope, length in locks if length]

    def succeeded(self, at: Attempt) -> None:
        """Clear the name + address failures (never the address or name counts) and remember the address."""
        self.tables["user+address"].clear(at.pair)
        self.known.add(at.pair)


class Locks(Protocol):
    """Failed-secret locks as the pages use them (every call may wait on the store)."""

    async def attempt(self, name: str, remote: str) -> Attempt: ...
    async def check(self, at: Attempt, *, only_pair: bool = False) -> tuple[int, list[str], list[str]]: ...
    async def failed(self, at: Attempt) -> list[tuple[str, float]]: ...
    async def succeeded(self, at: Attempt) -> None: ...


class MemoryLocks:
    """The locks of one portal instance: :class:`SignInLocks` in this process, on the monotonic clock."""

    def __init__(self, cfg: AuthConfig, monotonic: Callable[[], float]) -> None:
        self.locks = SignInLocks(cfg, monotonic)

    async def attempt(self, name: str, remote: str) -> Attempt:
        return self.locks.attempt(name, remote)

    async def check(self, at: Attempt, *, only_pair: bool = False) -> tuple[int, list[str], list[str]]:
        return self.locks.check(at, only_pair=only_pair)

    async def failed(self, at: Attempt) -> list[tuple[str, float]]:
        return self.locks.failed(at)

    async def succeeded(self, at: Attempt) -> None:
        self.locks.succeeded(at)


class SharedLocks:
    """The same locks kept in the store (``kind``: staff or resident), for instances that share it: each step is one
    write transaction running :class:`SignInLocks` over the rows, so a lock holds whichever instance is asked."""

    def __init__(self, cfg: AuthConfig, store: Store, kind: str, clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.store, self.kind, self.clock = cfg, store, kind, clock

    def _bound(self, conn: Conn) -> SignInLocks:
        c = self.cfg
        limits = {
            "user+address": c.max_failures_user_address,
            "address": c.max_failures_address,
            "user": c.max_failures_user,
        }
        tables: dict[str, LockTable] = {
            scope: StoredLockTable(conn, self.kind, scope, limit, c.failure_window_s, c.lock_max_s, self.clock)
            for scope, limit in limits.items()
        }
        return SignInLocks(
            c, self.clock, tables=tables, known=StoredKnownAddresses(conn, self.kind, KNOWN_ADDRESS_S, self.clock)
        )

    async def attempt(self, name: str, remote: str) -> Attempt:
        at: Attempt = await self.store.read(lambda c: self._bound(c).attempt(name, remote))
        return at

    async def check(self, at: Attempt, *, only_pair: bool = False) -> tuple[int, list[str], list[str]]:
        out: tuple[int, list[str], list[str]] = await self.store.run_write(
            lambda c: self._bound(c).check(at, only_pair=only_pair)
        )
        return out

    async def failed(self, at: Attempt) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = await self.store.run_write(lambda c: self._bound(c).failed(at))
        return out

    async def succeeded(self, at: Attempt) -> None:
        await self.store.run_write(lambda c: self._bound(c).succeeded(at))


def forget_stale_limits(conn: Conn, now: float, cfg: AuthConfig) -> None:
    """Delete the shared limits' rows that no longer count (the portal's housekeeping, in a write transaction): a
    bucket untouched for a day is full again (the slowest limit refills within two hours), strikes quiet for twice
    the longest lock are forgiven, known addresses expire."""
    conn.execute("DELETE FROM limit_buckets WHERE at < ?", (now - 86_400,))
    conn.execute(
        "DELETE FROM signin_strikes WHERE at < ? AND locked_until < ?",
        (now - 2 * max(cfg.failure_window_s, cfg.lock_max_s), now),
    )
    conn.execute("DELETE FROM signin_known WHERE at < ?", (now - KNOWN_ADDRESS_S,))


def sign_in_locks(
    cfg: AuthConfig, store: Store, kind: str, monotonic: Callable[[], float], wall: Callable[[], float] = time.time
) -> Locks:
    """The locks for the store: shared rows when instances share it (on the wall clock: instances share no other),
    else this process's tables (on the monotonic clock)."""
    return SharedLocks(cfg, store, kind, wall) if store.shared else MemoryLocks(cfg, monotonic)


class Auth:
    def __init__(
        self,
        cfg: PortalConfig,
        store: Store,
        cpu: ThreadPoolExecutor,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.cpu = cpu
        self.clock = clock
        self.monotonic = monotonic
        a = cfg.auth
        self.hasher = password_hasher(a)
        self._dummy_hash: str | None = None
        self.locks = sign_in_locks(a, store, "staff", monotonic, clock)

    async def _cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    async def hash_password(self, password: str) -> str:
        result: str = await self._cpu(self.hasher.hash, password)
        return result

    async def _verify(self, stored_hash: str, password: str) -> bool:
        def run() -> bool:
            try:
                return bool(self.hasher.verify(stored_hash, password))
            except (VerificationError, InvalidHashError):
                return False

        result: bool = await self._cpu(run)
        return result

    async def check_password(self, stored_hash: str | None, password: str) -> bool:
        """Does ``password`` match ``stored_hash``? Without a stored hash the dummy one is checked: the same work."""
        target = stored_hash if stored_hash is not None else await self.dummy_hash()
        ok = await self._verify(target, password[:MAX_PASSWORD])
        return ok and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        try:
            return self.hasher.check_needs_rehash(stored_hash)
        except (InvalidHashError, ValueError):
            return True

    async def dummy_hash(self) -> str:
        """A hash at the configured cost that no password matches: unknown names cost the same check."""
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash_password(secrets.token_hex(16))
        return self._dummy_hash

    # -- accounts

    async def create_user(self, name: str, role: str, password: str, *, must_change: bool) -> int:
        if not USER_NAME_RE.match(name):
            raise AuthError("users.bad_name")
        if role not in ROLES:
            raise AuthError("users.bad_role")
        check_new_password(password, name)
        h = await self.hash_password(password)
        try:
            uid: int = await self.store.run_write(lambda c: insert_user(c, name, role, h, must_change))
        except StoreConflict:
            raise AuthError("users.exists") from None
        log.info("user %s created with role %s", name, role)
        return uid

    # -- an administrator managing accounts (each change one transaction with its audit row)

    async def _manage(
        self,
        actor: User,
        name: str,
        action: str,
        change: Callable[[Conn, User], str],
        *,
        removes_admin: bool,
        remote: str,
    ) -> tuple[User, list[str]]:
        """Apply ``change(conn, user)`` (it returns the audit detail) to the account ``name``; (the account as it
        is now, the id hashes of its sessions that ended). The last administrator who can sign in is never
        disabled or made something else, and nobody does that to their own account."""

        def run(c: Conn) -> tuple[User, list[str]]:
            user = get_user(c, name)
            if user is None:
                raise AuthError("users.no_such_user")
            if removes_admin and user.role == "admin" and not user.disabled:
                if user.name.lower() == actor.name.lower():
                    raise AuthError("users.not_yourself")
                if count_admins(c) <= 1:
                    raise AuthError("users.last_admin")
            before = [r[0] for r in c.execute("SELECT id_hash FROM sessions WHERE user_id = ?", (user.id,))]
            detail = change(c, user)
            after = {r[0] for r in c.execute("SELECT id_hash FROM sessions WHERE user_id = ?", (user.id,))}
            audit.write(c, f"{actor.role}:{actor.name}", action, f"user:{user.name}", detail, remote[:64])
            now = get_user(c, user.name)
            assert now is not None
            return now, [h for h in before if h not in after]

        user, ended = await self.store.run_write(run)
        log.info("%s of user %s by %s", action, user.name, actor.name)
        return user, ended

    async def set_disabled(self, actor: User, name: str, disabled: bool, remote: str = "") -> tuple[User, list[str]]:
        """Switch an account off (it cannot sign in; its sessions end now) or on again."""

        def change(c: Conn, user: User) -> str:
            if disabled:
                c.execute("UPDATE users SET disabled_at = coalesce(disabled_at, ?) WHERE id = ?", (now_text(), user.id))
                c.execute("DELETE FROM sessions WHERE user_id = ?", (user.id,))
                return "sessions ended"
            c.execute("UPDATE users SET disabled_at = NULL WHERE id = ?", (user.id,))
            return ""

        return await self._manage(
            actor, name, "user.disable" if disabled else "user.enable", change, removes_admin=disabled, remote=remote
        )

    async def set_role(self, actor: User, name: str, role: str, remote: str = "") -> tuple[User, list[str]]:
        """Give an account another role; an administrator sees every site, so a new administrator's sites go."""
        if role not in ROLES:
            raise AuthError("users.bad_role_change")

        def change(c: Conn, user: User) -> str:
            c.execute(
                "UPDATE users SET role = ?, sites = CASE WHEN ? = 'admin' THEN NULL ELSE sites END WHERE id = ?",
                (role, role, user.id),
            )
            return f"{user.role} -> {role}"

        return await self._manage(actor, name, "user.role", change, removes_admin=role != "admin", remote=remote)

    async def reset_password(self, actor: User, name: str, remote: str = "") -> tuple[User, str, list[str]]:
        """A one-time password for an account whose owner forgot theirs: the old one stops working, every session
        ends, and the next sign-in must set a new password. The one-time password is returned to show once (it is
        never logged or stored but as a hash)."""
        if name.lower() == actor.name.lower():
            raise AuthError("users.not_yourself")
        password = "-".join(secrets.token_hex(3) for _ in range(4))  # 24 hex digits: read out over a phone
        h = await self.hash_password(password)

        def change(c: Conn, user: User) -> str:
            c.execute(
                "UPDATE users SET password_hash = ?, must_change = 1, password_changed_at = ? WHERE id = ?",
                (h, now_text(), user.id),
            )
            c.execute("DELETE FROM sessions WHERE user_id = ?", (user.id,))
            return "one-time password; sessions ended"

        user, ended = await self._manage(actor, name, "user.password_reset", change, removes_admin=False, remote=remote)
        if user.name == "admin":  # the first administrator's one-time password in its file is spent too
            await self._cpu(self.cfg.data_path(FIRST_ADMIN_FILE).unlink, True)
        return user, password, ended

    async def ensure_admin(self) -> Path | None:
        """On a store without any admin, create ``admin`` with a random one-time password, write it to
        :data:`FIRST_ADMIN_FILE` in the data folder (mode 0600; never to a log or stdout, which the journal keeps)
        and return that file. The file goes when ``admin`` sets a password of their own.

        (Without *any* admin rather than without any user, so a guard added by a set-up script before
        the first start does not leave the estate without someone who can manage accounts.) Called at
        start-up, so it also makes the dummy hash before the first sign-in could wait for it.
        """
        await self.dummy_hash()
        if await self.store.read(count_admins):
            return None
        password = secrets.token_urlsafe(12)
        h = await self.hash_password(password)

        def create(conn: Conn) -> bool:
            if count_admins(conn) or get_user(conn, "admin") is not None:
                return False
            insert_user(conn, "admin", "admin", h, True)
            return True

        path = self.cfg.data_path(FIRST_ADMIN_FILE)
        await self._cpu(write_secret, path, (password + "\n").encode())  # before the account: never one without
        if not await self.store.run_write(create):  # another process made one meanwhile
            await self._cpu(path.unlink, True)
            return None
        log.warning("no admin yet: created 'admin'; its one-time password is in %s (mode 0600)", path)
        return path

    # -- sign-in

    @staticmethod
    def _audit_ids(at: Attempt, user: User | None) -> tuple[str, str]:
        """(actor, target) of an audit row; an unknown name only as a digest (it may be a password)."""
        if user is not None:
            return f"{user.role}:{user.name}", f"user:{user.name}"
        return "unknown", f"name-sha256:{hashlib.sha256(at.user_key.encode()).hexdigest()[:16]}"

    async def _find(self, name: str) -> User | None:
        return await self.store.read(lambda c: get_user(c, name)) if name else None

    async def authenticate(self, name: str, password: str, remote: str) -> User:
        """The user, or :class:`AuthError`: ``login.failed``, or ``login.throttled`` with ``retry_after`` (s)."""
        at = await self.locks.attempt(name, remote)
        retry, scopes, first = await self.locks.check(at)
        if retry:
            await self._refused(at, retry, scopes, first)
        user = await self._find(at.name) if len(password) <= MAX_PASSWORD else None
        stored = user.password_hash if user is not None else await self.dummy_hash()
        ok = await self._verify(stored, password[:MAX_PASSWORD]) and user is not None  # same work either way
        if not ok:
            await self._failed(at, user, "wrong password" if user is not None else "unknown user name")
            raise AuthError("login.failed")
        assert user is not None
        if user.disabled:  # told only to someone who knows the password
            actor, target = self._audit_ids(at, user)
            await self.store.run_write(lambda c: audit.write(c, actor, "signin.disabled", target, "", at.remote))
            log.info("sign-in of disabled user %s from %s refused", user.name, at.remote)
            raise AuthError("login.disabled")
        await self.locks.succeeded(at)
        new_hash = await self.hash_password(password) if self.needs_rehash(user.password_hash) else None
        actor, target = self._audit_ids(at, user)

        def record(c: Conn) -> None:
            if new_hash is not None:  # only over the hash just checked (a password change in between wins)
                c.execute(
                    "UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ?",
                    (new_hash, user.id, user.password_hash),
                )
            audit.write(c, actor, "signin", target, "rehashed" if new_hash else "", at.remote)

        await self.store.run_write(record)
        if new_hash is not None:
            log.info("password hash of %s redone at the configured cost", user.name)
        return user

    async def _refused(self, at: Attempt, retry: int, scopes: list[str], first: list[str]) -> None:
        if first:  # one row per lock, not per hammered request
            actor, target = self._audit_ids(at, await self._find(at.name))
            detail = f"locked ({', '.join(scopes)}) for {retry} s more"
            await self.store.run_write(lambda c: audit.write(c, actor, "signin.refused", target, detail, at.remote))
        log.info("sign-in refused for %r from %s: %s locked", at.name, at.remote, "/".join(scopes))
        raise AuthError("login.throttled", retry_after=retry)

    async def _failed(self, at: Attempt, user: User | None, why: str) -> None:
        """Count a failure against every key that applies and write it (and any lock it starts) to the audit."""
        started = await self.locks.failed(at)
        actor, target = self._audit_ids(at, user)

        def record(c: Conn) -> None:
            audit.write(c, actor, "signin.failed", target, why, at.remote)
            for scope, length in started:
                audit.write(c, actor, "signin.lock", target, f"{scope} locked for {length:.0f} s", at.remote)

        await self.store.run_write(record)
        log.info(
            "failed sign-in for %r from %s (%s)%s",
            at.name,
            at.remote,
            why,
            "".join(f"; {scope} locked for {length:.0f} s" for scope, length in started),
        )

    async def change_password(self, session: Session, current: str, new: str, confirm: str, *, remote: str = "") -> str:
        """Check and set a new password; ends every session of the user and returns a new session token.

        A wrong current password counts as a failed sign-in of the user from ``remote``.
        """
        user = session.user
        at = await self.locks.attempt(user.name, remote)
        retry, _, _ = await self.locks.check(at, only_pair=True)
        if retry:
            raise AuthError("login.throttled", retry_after=retry)
        if not await self._verify(user.password_hash, current[:MAX_PASSWORD]):
            await self._failed(at, user, "wrong current password at a password change")
            raise AuthError("password.wrong_current")
        check_new_password(new, user.name)
        if new != confirm:
            raise AuthError("password.mismatch")
        if new == current:
            raise AuthError("password.same")
        h = await self.hash_password(new)
        token = secrets.token_urlsafe(32)
        now = self.clock()
        csrf = secrets.token_urlsafe(32)
        actor, target = self._audit_ids(at, user)

        def change(conn: Conn) -> None:
            conn.execute(
                "UPDATE users SET password_hash = ?, must_change = 0, password_changed_at = ? WHERE id = ?",
                (h, now_text(), user.id),
            )
            conn.execute("DELETE FROM sessions WHERE user_id = ?", (user.id,))
            conn.execute(_NEW_SESSION, (hash_token(token), user.id, csrf, now, now))
            audit.write(conn, actor, "password.change", target, "other sessions ended", at.remote)

        await self.store.run_write(change)
        log.info("user %s changed the password", user.name)
        if user.name == "admin":  # the first administrator's one-time password is spent
            await self._cpu(self.cfg.data_path(FIRST_ADMIN_FILE).unlink, True)
        return token

    # -- sessions

    async def start_session(
        self,
        user: User,
        old: Session | None = None,
        station_id: int | None = None,
        on_start: Callable[[Conn], None] | None = None,
    ) -> str:
        """A new session (new id) for ``user``; ``old`` (the pre-sign-in one, if any) is deleted. ``station_id``:
        signed on at a guard station (a shift-long session bound to the station's cookie); ``on_start`` runs in
        the same transaction (the station's shift and handover records)."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        csrf = secrets.token_urlsafe(32)

        def create(conn: Conn) -> None:
            if old is not None:
                conn.execute("DELETE FROM sessions WHERE id_hash = ?", (old.id_hash,))
            conn.execute(_NEW_SESSION, (hash_token(token), user.id, csrf, now, now))
            if station_id is not None:
                conn.execute("UPDATE sessions SET station_id = ? WHERE id_hash = ?", (station_id, hash_token(token)))
            if on_start is not None:
                on_start(conn)

        await self.store.run_write(create)
        log.info("user %s signed in", user.name)
        return token

    async def end_session(
        self, session: Session, remote: str = "", on_end: Callable[[Conn], None] | None = None
    ) -> None:
        u = session.user

        def end(c: Conn) -> None:
            c.execute("DELETE FROM sessions WHERE id_hash = ?", (session.id_hash,))
            audit.write(c, f"{u.role}:{u.name}", "signout", f"user:{u.name}", remote=remote[:64])
            if on_end is not None:
                on_end(c)

        await self.store.run_write(end)
        log.info("user %s signed out", u.name)

    async def load_session(self, request: web.Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token or len(token) > 100:
            return None
        h = hash_token(token)
        s = await self.store.read(lambda c: get_session(c, h))
        if s is None or s.user.disabled:
            return None
        if s.station_id is not None and not await self._at_station(request, s.station_id):
            return None  # a station's session works only in the station's browser
        now = self.clock()
        if self.expired(s.created, s.last_seen, s.station_id, now):
            self.store.enqueue_nowait(FnOp(lambda c: c.execute("DELETE FROM sessions WHERE id_hash = ?", (h,))))
            return None
        if now - s.last_seen > TOUCH_EVERY_S:
            self.store.enqueue_nowait(
                FnOp(lambda c: c.execute("UPDATE sessions SET last_seen = ? WHERE id_hash = ?", (now, h)))
            )
        return s

    def expired(self, created: float, last_seen: float, station_id: int | None, now: float) -> bool:
        sc = self.cfg.sessions
        if station_id is not None:  # a shift: quiet hours do not end it
            return now - created > sc.station_timeout_s
        return now - created > sc.absolute_timeout_s or now - last_seen > sc.idle_timeout_s

    async def _at_station(self, request: web.Request, station_id: int) -> bool:
        token = request.cookies.get(STATION_COOKIE, "")
        if not token or len(token) > 100:
            return False
        h = hash_token(token)
        row = await self.store.read(
            lambda c: c.execute("SELECT id FROM stations WHERE token_hash = ? AND revoked_at IS NULL", (h,)).fetchone()
        )
        return row is not None and int(row[0]) == station_id

    async def alive(self, sessions: set[str]) -> set[str]:
        """Which of these sessions (by id hash) are still in force: the console sockets' check at every beat."""
        now = self.clock()

        def load(c: Conn) -> list[Row]:
            return c.execute(
                "SELECT s.id_hash, s.created, s.last_seen, s.station_id, u.must_change FROM sessions s"
                " JOIN users u ON u.id = s.user_id LEFT JOIN stations st ON st.id = s.station_id"
                f" WHERE {db.in_values(c, 's.id_hash')} AND u.disabled_at IS NULL"
                " AND (s.station_id IS NULL OR st.revoked_at IS NULL)",
                (db.values(c, sorted(sessions)),),
            ).fetchall()

        rows = await self.store.read(load)
        return {
            r["id_hash"]
            for r in rows
            if not r["must_change"] and not self.expired(r["created"], r["last_seen"], r["station_id"], now)
        }

    async def purge_sessions(self) -> int:
        now = self.clock()
        sc = self.cfg.sessions

        def purge(conn: Conn) -> int:
            cur = conn.execute(
                "DELETE FROM sessions WHERE (station_id IS NULL AND (created < ? OR last_seen < ?))"
                " OR (station_id IS NOT NULL AND created < ?)",
                (now - sc.absolute_timeout_s, now - sc.idle_timeout_s, now - sc.station_timeout_s),
            )
            if self.store.shared:
                forget_stale_limits(conn, now, self.cfg.auth)
            return int(cur.rowcount)

        n: int = await self.store.run_write(purge)
        return n

    def set_session_cookie(self, response: web.StreamResponse, token: str) -> None:
        response.set_cookie(
            SESSION_COOKIE, token, httponly=True, samesite="Lax", secure=self.cfg.cookie_secure, path="/"
        )

    def clear_session_cookie(self, response: web.StreamResponse) -> None:
        response.del_cookie(SESSION_COOKIE, path="/")

    # -- origin and CSRF

    def allowed_origins(self, request: web.Request) -> set[str]:
        scheme = "https" if self.cfg.cookie_secure else request.scheme
        return {f"{scheme}://{request.host}".lower(), *(o.lower().rstrip("/") for o in self.cfg.allowed_origins)}

    def origin_ok(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            ref = request.headers.get("Referer")
            if not ref:
                return False
            parts = urlsplit(ref)
            origin = f"{parts.scheme}://{parts.netloc}"
        return origin.lower() in self.allowed_origins(request)

    async def csrf_ok(self, request: web.Request, expected: str) -> bool:
        given = request.headers.get(CSRF_HEADER, "")
        if not given and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await read_form(request)  # cached: the handler reads the same form
            value = form.get(CSRF_FIELD, "")
            given = value if isinstance(value, str) else ""
        return bool(expected) and bool(given) and hmac.compare_digest(given.encode(), expected.encode())


# ---------------------------------------------------------------- middleware


def wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/") or request.path == "/ws" or request.path == "/metrics"


def middleware(
    get_auth: Callable[[web.Request], Auth], deny: Callable[[web.Request, int, str], web.StreamResponse]
) -> Any:
    """The access middleware. ``deny(request, status, i18n_key)`` renders a refusal (page or JSON)."""

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.match_info.http_exception is not None or request.path.startswith("/static/"):
            return await handler(request)  # 404 / 405 (the router answers) and public files
        auth = get_auth(request)
        access = access_of(request)
        if access.machine:
            return await handler(request)
        session = await auth.load_session(request)
        new_pre: str | None = None
        if session is not None:
            request[SESSION_KEY] = session
            request[CSRF_KEY] = session.csrf_token
        else:
            pre = request.cookies.get(PRE_CSRF_COOKIE, "")
            if not (20 <= len(pre) <= 100):
                pre = new_pre = secrets.token_urlsafe(32)
            request[CSRF_KEY] = pre

        is_ws = request.headers.get("Upgrade", "").lower() == "websocket"
        if (request.method not in SAFE_METHODS or is_ws) and not auth.origin_ok(request):
            log.info("refused %s %s: origin %r", request.method, request.path, request.headers.get("Origin"))
            return deny(request, 403, "error.csrf")
        if not access.public and session is None:
            # Before the CSRF check: a form sent from a page whose session has ended (signed out elsewhere, timed
            # out, the account disabled meanwhile) does nothing either way, and its sender needs to sign in again,
            # not a CSRF refusal.
            if wants_json(request):
                return deny(request, 401, "login.title")
            raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='/')}")
        if request.method not in SAFE_METHODS:
            expected = session.csrf_token if session else request.cookies.get(PRE_CSRF_COOKIE, "")
            if not await auth.csrf_ok(request, expected):
                log.info("refused %s %s: missing or wrong CSRF token", request.method, request.path)
                return deny(request, 403, "error.csrf")

        if not access.public:
            assert session is not None
            if session.user.must_change and not access.during_password_change:
                if wants_json(request):
                    return deny(request, 403, "password.forced")
                raise web.HTTPSeeOther("/password")
            if access.roles is not None and session.user.role not in access.roles:
                return deny(request, 403, "error.forbidden")
        response = await handler(request)
        if new_pre is not None and not response.prepared and response.content_type == "text/html":
            response.set_cookie(
                PRE_CSRF_COOKIE, new_pre, httponly=True, samesite="Strict", secure=auth.cfg.cookie_secure, path="/"
            )
        return response

    return check


def safe_next(value: str | None, default: str = "/console") -> str:
    """A local path to go to after sign-in (never another site: no scheme, no //host)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value
