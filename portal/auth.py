"""Sign-in, server-side sessions, roles and CSRF protection.

Passwords are argon2id hashes (hashing runs on a worker thread). A session is a random 256-bit
cookie value whose SHA-256 is the key in the store, with an idle and an absolute timeout; signing
in always issues a new one. Every route is closed unless marked: :func:`public` opens it to
everyone, :func:`roles` narrows it to some roles, :func:`during_password_change` lets a user who
must change the password reach it. Every state-changing request (and every WebSocket upgrade)
must come from an allowed Origin, and a state-changing request must carry the session's CSRF token
(form field ``csrf`` or header ``X-CSRF-Token``); before sign-in a cookie holds that token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from portal.config import PortalConfig
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
USER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOUCH_EVERY_S = 30.0
THROTTLE_MAX = 10  # failed sign-ins per (user, address) ...
THROTTLE_WINDOW_S = 15 * 60.0  # ... within this window

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


def check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AuthError("password.too_short", n=MIN_PASSWORD)
    if len(password) > MAX_PASSWORD:
        raise AuthError("password.too_short", n=MIN_PASSWORD)


class Auth:
    def __init__(self, cfg: PortalConfig, store: Store, cpu: ThreadPoolExecutor, *,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.store = store
        self.cpu = cpu
        self.clock = clock
        self.monotonic = monotonic
        self.hasher = PasswordHasher()  # argon2id with the library's (RFC 9106 low-memory) defaults
        self._dummy_hash: str | None = None
        self._failures: dict[str, deque[float]] = {}

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

    # -- accounts

    async def create_user(self, name: str, role: str, password: str, *, must_change: bool) -> int:
        if not USER_NAME_RE.match(name):
            raise AuthError("users.bad_name")
        if role not in ROLES:
            raise AuthError("users.bad_role")
        check_new_password(password)
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
        the first start does not leave the estate without someone who can manage accounts.)
        """
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

    def _throttled(self, key: str) -> bool:
        now = self.monotonic()
        q = self._failures.get(key)
        if q is None:
            return False
        while q and q[0] < now - THROTTLE_WINDOW_S:
            q.popleft()
        if not q:
            del self._failures[key]
            return False
        return len(q) >= THROTTLE_MAX

    def _fail(self, key: str) -> None:
        if len(self._failures) > 10_000:  # bounded memory under a spray of names
            self._failures.clear()
        self._failures.setdefault(key, deque()).append(self.monotonic())

    async def authenticate(self, name: str, password: str, remote: str) -> User:
        """The user, or :class:`AuthError` (``login.failed`` / ``login.throttled``)."""
        key = f"{name.lower()}|{remote}"
        if self._throttled(key):
            raise AuthError("login.throttled")
        user = await self.store.read(lambda c: get_user(c, name)) if name and len(password) <= MAX_PASSWORD else None
        if user is None:
            if self._dummy_hash is None:
                self._dummy_hash = await self.hash_password(secrets.token_hex(16))
            await self._verify(self._dummy_hash, password[:MAX_PASSWORD])  # same time as a real check
            self._fail(key)
            raise AuthError("login.failed")
        if not await self._verify(user.password_hash, password):
            self._fail(key)
            log.info("failed sign-in for %s from %s", user.name, remote)
            raise AuthError("login.failed")
        self._failures.pop(key, None)
        return user

    async def change_password(self, session: Session, current: str, new: str, confirm: str) -> str:
        """Check and set a new password; ends every session of the user and returns a new session token."""
        user = session.user
        if not await self._verify(user.password_hash, current[:MAX_PASSWORD]):
            raise AuthError("password.wrong_current")
        check_new_password(new)
        if new != confirm:
            raise AuthError("password.mismatch")
        if new == current:
            raise AuthError("password.same")
        h = await self.hash_password(new)
        token = secrets.token_urlsafe(32)
        now = self.clock()
        csrf = secrets.token_urlsafe(32)

        def change(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE users SET password_hash = ?, must_change = 0, password_changed_at = datetime('now')"
                         " WHERE id = ?", (h, user.id))
            conn.execute("DELETE FROM sessions WHERE user_id = ?", (user.id,))
            conn.execute(_NEW_SESSION, (hash_token(token), user.id, csrf, now, now))

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

    async def end_session(self, session: Session) -> None:
        await self.store.run_write(lambda c: c.execute("DELETE FROM sessions WHERE id_hash = ?", (session.id_hash,)))
        log.info("user %s signed out", session.user.name)

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
