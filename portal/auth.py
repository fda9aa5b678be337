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
address is ``request.remote`` after :func:`portal.ratelimit.real_client` (trusted proxies).

The counts live in memory, each table capped (least recently used keys forgotten first), and start empty
after a restart. Every success, failure, lock and first refusal under a lock, sign-out and password change
is an audit row (:mod:`portal.audit`), never with the password; an unknown name is kept only as a digest,
since it is often a password typed into the wrong field.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from portal import audit
from portal.config import AuthConfig, PortalConfig
from portal.store import (
    ROLES,
    FnOp,
    Session,
    Store,
    StoreConflict,
    User,
    count_admins,
    get_session,
    get_user,
    insert_user,
)

log = logging.getLogger("portal.auth")

SESSION_COOKIE = "gh_session"
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


def _mark(handler: Any, **kw: Any) -> None:
    old: Access = getattr(handler, "__portal_access__", Access())
    fields = {"public": old.public, "roles": old.roles, "during_password_change": old.during_password_change}
    fields.update(kw)
    handler.__portal_access__ = Access(**fields)


def public(handler: H) -> H:
    _mark(handler, public=True)
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
    return PasswordHasher(time_cost=cfg.argon2_time_cost, memory_cost=cfg.argon2_memory_kib,
                          parallelism=cfg.argon2_parallelism)


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

    def __init__(self, limit: int, window_s: float, lock_max_s: float, clock: Callable[[], float],
                 max_keys: int = MAX_KEYS) -> None:
        self.limit = limit
        self.window_s = window_s
        self.lock_max_s = lock_max_s
        self.clock = clock
        self.max_keys = max_keys
        self._keys: OrderedDict[str, _Strikes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def _get(self, key: str, now: float) -> _Strikes | None:
        s = self._keys.get(key)
        if s is None:
            return None
        while s.failures and s.failures[0] <= now - self.window_s:
            s.failures.popleft()
        if s.level and s.until <= now - self.lock_max_s:
            s.level = 0  # quiet long enough: forgiven
        if not s.failures and not s.level and s.until <= now:
            del self._keys[key]
            return None
        self._keys.move_to_end(key)
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
        return s.refused == 1

    def fail(self, key: str) -> float:
        """Count a failure; the length of the lock it starts, else 0."""
        now = self.clock()
        s = self._get(key, now)
        if s is None:
            s = self._keys[key] = _Strikes()
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        if s.until > now:
            return 0.0
        s.failures.append(now)
        if len(s.failures) < self.limit:
            return 0.0
        length = min(self.window_s * 2.0 ** min(s.level, 30), self.lock_max_s)
        s.until, s.level, s.refused = now + length, s.level + 1, 0
        s.failures.clear()
        return length

    def clear(self, key: str) -> None:
        """Forget the failures (a lock in force and the doubling stay)."""
        s = self._keys.get(key)
        if s is not None:
            s.failures.clear()


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


@dataclass(frozen=True, slots=True)
class _Attempt:
    """Who an attempt is about, as the locks and the audit see it."""

    name: str  # as typed (capped)
    remote: str
    pair: str
    address: str
    user_key: str
    known: bool  # the user has signed in from this address before

    def audit_ids(self, user: User | None) -> tuple[str, str]:
        """(actor, target) of an audit row; an unknown name only as a digest (it may be a password)."""
        if user is not None:
            return f"{user.role}:{user.name}", f"user:{user.name}"
        return "unknown", f"name-sha256:{hashlib.sha256(self.user_key.encode()).hexdigest()[:16]}"


class Auth:
    def __init__(self, cfg: PortalConfig, store: Store, cpu: ThreadPoolExecutor, *,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.store = store
        self.cpu = cpu
        self.clock = clock
        self.monotonic = monotonic
        a = cfg.auth
        self.hasher = password_hasher(a)
        self._dummy_hash: str | None = None
        self.locks = {
            "user+address": LockTable(a.max_failures_user_address, a.failure_window_s, a.lock_max_s, monotonic,
                                      max_keys=2 * MAX_KEYS),
            "address": LockTable(a.max_failures_address, a.failure_window_s, a.lock_max_s, monotonic),
            "user": LockTable(a.max_failures_user, a.failure_window_s, a.lock_max_s, monotonic),
        }
        self.known = KnownAddresses(KNOWN_ADDRESS_S, monotonic)

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

    async def ensure_admin(self) -> str | None:
        """On a store without any admin, create ``admin`` with a random one-time password and return it.

        (Without *any* admin rather than without any user, so a guard added by a set-up script before
        the first start does not leave the estate without someone who can manage accounts.) Called at
        start-up, so it also makes the dummy hash before the first sign-in could wait for it.
        """
        await self.dummy_hash()
        if await self.store.read(count_admins):
            return None
        password = secrets.token_urlsafe(12)
        h = await self.hash_password(password)

        def create(conn: sqlite3.Connection) -> bool:
            if count_admins(conn) or get_user(conn, "admin") is not None:
                return False
            insert_user(conn, "admin", "admin", h, True)
            return True

        if not await self.store.run_write(create):
            return None
        log.warning("no admin yet: created 'admin' with a one-time password (printed on stdout, not logged)")
        return password

    # -- sign-in

    def _attempt(self, name: str, remote: str) -> _Attempt:
        name = name[:64]
        user_key = name.lower()
        address = address_key(remote)
        pair = f"{user_key}|{address}"
        return _Attempt(name, remote[:64], pair, address, user_key, pair in self.known)

    def _keys(self, at: _Attempt) -> list[tuple[str, str]]:
        """The (lock table, key) pairs that apply to an attempt."""
        keys = [("user+address", at.pair)]
        if not at.known:
            keys += [("address", at.address), ("user", at.user_key)]
        return keys

    async def _find(self, name: str) -> User | None:
        return await self.store.read(lambda c: get_user(c, name)) if name else None

    async def authenticate(self, name: str, password: str, remote: str) -> User:
        """The user, or :class:`AuthError`: ``login.failed``, or ``login.throttled`` with ``retry_after`` (s)."""
        at = self._attempt(name, remote)
        left = {scope: self.locks[scope].lock_left(key) for scope, key in self._keys(at)}
        if any(left.values()):
            await self._refused(at, left)
        user = await self._find(at.name) if len(password) <= MAX_PASSWORD else None
        stored = user.password_hash if user is not None else await self.dummy_hash()
        ok = await self._verify(stored, password[:MAX_PASSWORD]) and user is not None  # same work either way
        if not ok:
            await self._failed(at, user, "wrong password" if user is not None else "unknown user name")
            raise AuthError("login.failed")
        assert user is not None
        self.locks["user+address"].clear(at.pair)
        self.known.add(at.pair)
        new_hash = await self.hash_password(password) if self.needs_rehash(user.password_hash) else None
        actor, target = at.audit_ids(user)

        def record(c: sqlite3.Connection) -> None:
            if new_hash is not None:  # only over the hash just checked (a password change in between wins)
                c.execute("UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ?",
                          (new_hash, user.id, user.password_hash))
            audit.write(c, actor, "signin", target, "rehashed" if new_hash else "", at.remote)

        await self.store.run_write(record)
        if new_hash is not None:
            log.info("password hash of %s redone at the configured cost", user.name)
        return user

    async def _refused(self, at: _Attempt, left: dict[str, float]) -> None:
        scopes = [scope for scope, s in left.items() if s > 0]
        first = [scope for scope, key in self._keys(at) if scope in scopes and self.locks[scope].refuse(key)]
        retry = math.ceil(max(left.values()))
        if first:  # one row per lock, not per hammered request
            actor, target = at.audit_ids(await self._find(at.name))
            detail = f"locked ({', '.join(scopes)}) for {retry} s more"
            await self.store.run_write(lambda c: audit.write(c, actor, "signin.refused", target, detail, at.remote))
        log.info("sign-in refused for %r from %s: %s locked", at.name, at.remote, "/".join(scopes))
        raise AuthError("login.throttled", retry_after=retry)

    async def _failed(self, at: _Attempt, user: User | None, why: str) -> None:
        """Count a failure against every key that applies and write it (and any lock it starts) to the audit."""
        locks = [(scope, self.locks[scope].fail(key)) for scope, key in self._keys(at)]
        if at.known:  # exempt from the address lock, but its failures still count there
            self.locks["address"].fail(at.address)
        started = [(scope, length) for scope, length in locks if length]
        actor, target = at.audit_ids(user)

        def record(c: sqlite3.Connection) -> None:
            audit.write(c, actor, "signin.failed", target, why, at.remote)
            for scope, length in started:
                audit.write(c, actor, "signin.lock", target, f"{scope} locked for {length:.0f} s", at.remote)

        await self.store.run_write(record)
        log.info("failed sign-in for %r from %s (%s)%s", at.name, at.remote, why,
                 "".join(f"; {scope} locked for {length:.0f} s" for scope, length in started))

    async def change_password(self, session: Session, current: str, new: str, confirm: str, *,
                              remote: str = "") -> str:
        """Check and set a new password; ends every session of the user and returns a new session token.

        A wrong current password counts as a failed sign-in of the user from ``remote``.
        """
        user = session.user
        at = self._attempt(user.name, remote)
        left = self.locks["user+address"].lock_left(at.pair)
        if left:
            raise AuthError("login.throttled", retry_after=math.ceil(left))
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
        actor, target = at.audit_ids(user)

        def change(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE users SET password_hash = ?, must_change = 0, password_changed_at = datetime('now')"
                         " WHERE id = ?", (h, user.id))
            conn.execute("DELETE FROM sessions WHERE user_id = ?", (user.id,))
            conn.execute(_NEW_SESSION, (hash_token(token), user.id, csrf, now, now))
            audit.write(conn, actor, "password.change", target, "other sessions ended", at.remote)

        await self.store.run_write(change)
        log.info("user %s changed the password", user.name)
        return token

    # -- sessions

    async def start_session(self, user: User, old: Session | None = None) -> str:
        """A new session (new id) for ``user``; ``old`` (the pre-sign-in one, if any) is deleted."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        csrf = secrets.token_urlsafe(32)

        def create(conn: sqlite3.Connection) -> None:
            if old is not None:
                conn.execute("DELETE FROM sessions WHERE id_hash = ?", (old.id_hash,))
            conn.execute(_NEW_SESSION, (hash_token(token), user.id, csrf, now, now))

        await self.store.run_write(create)
        log.info("user %s signed in", user.name)
        return token

    async def end_session(self, session: Session, remote: str = "") -> None:
        u = session.user

        def end(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM sessions WHERE id_hash = ?", (session.id_hash,))
            audit.write(c, f"{u.role}:{u.name}", "signout", f"user:{u.name}", remote=remote[:64])

        await self.store.run_write(end)
        log.info("user %s signed out", u.name)

    async def load_session(self, request: web.Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token or len(token) > 100:
            return None
        h = hash_token(token)
        s = await self.store.read(lambda c: get_session(c, h))
        if s is None:
            return None
        now = self.clock()
        sc = self.cfg.sessions
        if now - s.created > sc.absolute_timeout_s or now - s.last_seen > sc.idle_timeout_s:
            self.store.enqueue_nowait(FnOp(lambda c: c.execute("DELETE FROM sessions WHERE id_hash = ?", (h,))))
            return None
        if now - s.last_seen > TOUCH_EVERY_S:
            self.store.enqueue_nowait(
                FnOp(lambda c: c.execute("UPDATE sessions SET last_seen = ? WHERE id_hash = ?", (now, h))))
        return s

    async def purge_sessions(self) -> int:
        now = self.clock()
        sc = self.cfg.sessions

        def purge(conn: sqlite3.Connection) -> int:
            cur = conn.execute("DELETE FROM sessions WHERE created < ? OR last_seen < ?",
                               (now - sc.absolute_timeout_s, now - sc.idle_timeout_s))
            return int(cur.rowcount)

        n: int = await self.store.run_write(purge)
        return n

    def set_session_cookie(self, response: web.StreamResponse, token: str) -> None:
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Lax", secure=self.cfg.cookie_secure,
                            path="/")

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
            form = await request.post()  # cached: the handler reads the same form
            value = form.get(CSRF_FIELD, "")
            given = value if isinstance(value, str) else ""
        return bool(expected) and bool(given) and hmac.compare_digest(given.encode(), expected.encode())


# ---------------------------------------------------------------- middleware


def wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/") or request.path == "/ws" or request.path == "/metrics"


def middleware(get_auth: Callable[[web.Request], Auth],
               deny: Callable[[web.Request, int, str], web.StreamResponse]) -> Any:
    """The access middleware. ``deny(request, status, i18n_key)`` renders a refusal (page or JSON)."""

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.match_info.http_exception is not None or request.path.startswith("/static/"):
            return await handler(request)  # 404 / 405 (the router answers) and public files
        auth = get_auth(request)
        access = access_of(request)
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
        if request.method not in SAFE_METHODS:
            expected = session.csrf_token if session else request.cookies.get(PRE_CSRF_COOKIE, "")
            if not await auth.csrf_ok(request, expected):
                log.info("refused %s %s: missing or wrong CSRF token", request.method, request.path)
                return deny(request, 403, "error.csrf")

        if not access.public:
            if session is None:
                if wants_json(request):
                    return deny(request, 401, "login.title")
                raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='/')}")
            if session.user.must_change and not access.during_password_change:
                if wants_json(request):
                    return deny(request, 403, "password.forced")
                raise web.HTTPSeeOther("/password")
            if access.roles is not None and session.user.role not in access.roles:
                return deny(request, 403, "error.forbidden")
        response = await handler(request)
        if new_pre is not None and not response.prepared and response.content_type == "text/html":
            response.set_cookie(PRE_CSRF_COOKIE, new_pre, httponly=True, samesite="Strict",
                                secure=auth.cfg.cookie_secure, path="/")
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
