"""Staff accounts, for administrators: create one, and per account change the role or the sites it sees, reset a
forgotten password (a one-time password shown once; the next sign-in must set a new one), disable or enable it.

Every change is one transaction with its audit row (:meth:`portal.web.auth.Auth.set_role` and the others). Disabling,
a password reset and a change of role ask first (:mod:`portal.web.confirm`). A disabled account's sessions end at once
and its open consoles are closed; it cannot sign in again until it is enabled. The last administrator who can sign
in cannot be disabled or made something else, and nobody does either to their own account.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

from aiohttp import web

from portal.store import (
    ROLES,
    Conn,
    SitesError,
    User,
    audit,
    get_user,
    list_users,
    parse_sites,
    registry_site_codes,
    set_user_sites,
)
from portal.store.errors import StoreError
from portal.store.storekey import StoreKey, StoreKeyError
from portal.web.auth import SESSION_KEY, AuthError, roles
from portal.web.bodies import read_form
from portal.web.confirm import ask, confirmed
from portal.web.services import SERVICES
from portal.web.views import render, translator

log = logging.getLogger("portal.users")
routes = web.RouteTableDef()


def _me(request: web.Request) -> User:
    return request[SESSION_KEY].user


async def _users(request: web.Request, status: int = 200, **ctx: Any) -> web.Response:
    users: list[User] = await request.app[SERVICES].store.read(list_users)
    ctx.setdefault("error", None)
    ctx.setdefault("error_kw", {})
    ctx.setdefault("created", None)
    return render(request, "users.html", status=status, users=users, **ctx)


async def _account(request: web.Request) -> User:
    name = request.match_info["name"]
    user = await request.app[SERVICES].store.read(lambda c: get_user(c, name))
    if user is None:
        raise web.HTTPNotFound()
    return user


async def _user_page(request: web.Request, user: User, status: int = 200, **ctx: Any) -> web.Response:
    ctx.setdefault("error", None)
    ctx.setdefault("error_kw", {})
    ctx.setdefault("one_time", None)
    resp = render(
        request,
        "user.html",
        status=status,
        u=user,
        roles=ROLES,
        me=_me(request),
        notice=request.query.get("notice"),
        **ctx,
    )
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def _refused(request: web.Request, user: User, e: AuthError) -> web.Response:
    """An account change refused by a rule (the last administrator, one's own account)."""
    if e.key == "users.no_such_user":
        raise web.HTTPNotFound()
    status = 409 if e.key in ("users.last_admin", "users.not_yourself") else 400
    return await _user_page(request, user, status, error=e.key, error_kw=e.kw)


# ---------------------------------------------------------------- the list and new accounts


@routes.get("/users")
@roles("admin")
async def users_page(request: web.Request) -> web.StreamResponse:
    return await _users(request)


@routes.post("/users")
@roles("admin")
async def users_create(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    form = await read_form(request)
    name = str(form.get("name", "")).strip()
    role = str(form.get("role", ""))
    if role not in ("guard", "installer"):
        return await _users(request, 400, error="users.bad_role")
    try:
        sites = parse_sites(str(form.get("sites", "")), await svc.store.read(registry_site_codes))
    except SitesError as e:
        return await _users(request, 400, error=e.key, error_kw={"sites": ", ".join(e.sites)})
    try:
        await svc.auth.create_user(name, role, str(form.get("password", "")), must_change=True)
    except AuthError as e:
        return await _users(request, 400, error=e.key, error_kw=e.kw)
    me, remote = _me(request), request.remote or ""

    def record(c: Conn) -> None:
        if sites is not None:
            set_user_sites(c, name, sites)
        audit.write(
            c,
            f"{me.role}:{me.name}",
            "user.create",
            f"user:{name}",
            f"{role}, sites {','.join(sites) if sites is not None else 'all'}",
            remote[:64],
        )

    await svc.store.run_write(record)
    return await _users(request, created=name)


# ---------------------------------------------------------------- one account


@routes.get("/users/{name}")
@roles("admin")
async def user_page(request: web.Request) -> web.StreamResponse:
    user = await _account(request)
    resp = await _user_page(request, user, one_time=_take_one_time(request, user.name))
    if ONE_TIME_COOKIE in request.cookies:
        resp.del_cookie(ONE_TIME_COOKIE, path=f"/users/{user.name}")
    return resp


@routes.post(r"/users/{name}/sites")
@roles("admin")
async def users_set_sites(request: web.Request) -> web.StreamResponse:
    """Scope a guard or installer to some sites (blank: every site); their open consoles reconnect."""
    svc = request.app[SERVICES]
    user = await _account(request)
    form = await read_form(request)
    if user.role == "admin":
        return await _user_page(request, user, 400, error="users.admin_all_sites")
    try:
        sites = parse_sites(str(form.get("sites", "")), await svc.store.read(registry_site_codes))
    except SitesError as e:
        return await _user_page(request, user, 400, error=e.key, error_kw={"sites": ", ".join(e.sites)})
    me, remote = _me(request), request.remote or ""

    def put(c: Conn) -> None:
        set_user_sites(c, user.name, sites)
        audit.write(
            c,
            f"{me.role}:{me.name}",
            "user.sites",
            f"user:{user.name}",
            "all" if sites is None else ",".join(sites),
            remote[:64],
        )

    await svc.store.run_write(put)
    svc.hub.kick_label(user.name, "sites changed")
    log.info("sites of %s set to %s by %s", user.name, "all" if sites is None else ",".join(sites), me.name)
    raise web.HTTPSeeOther(f"/users/{user.name}?notice=sites")


@routes.post(r"/users/{name}/role")
@roles("admin")
async def users_set_role(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    user = await _account(request)
    form = await read_form(request)
    role = str(form.get("role", ""))
    if role not in ROLES:
        return await _user_page(request, user, 400, error="users.bad_role_change")
    if role == user.role:
        raise web.HTTPSeeOther(f"/users/{user.name}")
    tr = translator(request)
    if not confirmed(form):
        return ask(
            request,
            form,
            title_key="users.role_title",
            consequence_key=f"users.role_consequence_{role}",
            kw={"name": user.name, "old": tr(f"role.{user.role}"), "new": tr(f"role.{role}")},
            back=f"/users/{user.name}",
            button_key="users.role_go",
        )
    try:
        user, _ = await svc.auth.set_role(_me(request), user.name, role, request.remote or "")
    except AuthError as e:
        return await _refused(request, user, e)
    svc.hub.kick_label(user.name, "role changed")  # its consoles reconnect with the new role's rights
    raise web.HTTPSeeOther(f"/users/{user.name}?notice=role")


@routes.post(r"/users/{name}/disable")
@roles("admin")
async def users_disable(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    user = await _account(request)
    form = await read_form(request)
    if not confirmed(form):
        return ask(
            request,
            form,
            title_key="users.disable_title",
            consequence_key="users.disable_consequence",
            kw={"name": user.name},
            back=f"/users/{user.name}",
            button_key="users.disable_go",
        )
    try:
        user, ended = await svc.auth.set_disabled(_me(request), user.name, True, request.remote or "")
    except AuthError as e:
        return await _refused(request, user, e)
    svc.hub.end_sessions(ended, "account disabled")
    svc.hub.end_user(user.name, "account disabled")
    raise web.HTTPSeeOther(f"/users/{user.name}?notice=disabled")


@routes.post(r"/users/{name}/enable")
@roles("admin")
async def users_enable(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    user = await _account(request)
    await read_form(request)
    user, _ = await svc.auth.set_disabled(_me(request), user.name, False, request.remote or "")
    raise web.HTTPSeeOther(f"/users/{user.name}?notice=enabled")


@routes.post(r"/users/{name}/password")
@roles("admin")
async def users_reset_password(request: web.Request) -> web.StreamResponse:
    """A one-time password, shown on this answer only (never again, never logged)."""
    svc = request.app[SERVICES]
    user = await _account(request)
    form = await read_form(request)
    if not confirmed(form):
        return ask(
            request,
            form,
            title_key="users.reset_title",
            consequence_key="users.reset_consequence",
            kw={"name": user.name},
            back=f"/users/{user.name}",
            button_key="users.reset_go",
        )
    try:
        user, password, ended = await svc.auth.reset_password(_me(request), user.name, request.remote or "")
    except AuthError as e:
        return await _refused(request, user, e)
    svc.hub.end_sessions(ended, "password reset")
    svc.hub.end_user(user.name, "password reset")
    # Shown by the page this redirects to, once: a reload neither posts the reset again nor shows it again. It goes
    # there in a cookie sealed with the store key, bound to this sign-in and this account, for two minutes: never
    # stored, never logged, and opened by whichever instance of a centre serves the next page.
    resp = web.HTTPSeeOther(f"/users/{user.name}?notice=reset")
    until = int(time.time() + SHOWN_FOR_S)
    sealed = _store_key(request).seal(password, _bound(request, user.name, until))
    resp.set_cookie(
        ONE_TIME_COOKIE,
        f"{until}.{base64.urlsafe_b64encode(sealed).decode()}",
        max_age=int(SHOWN_FOR_S),
        path=f"/users/{user.name}",
        httponly=True,
        samesite="Strict",
        secure=svc.auth.cfg.cookie_secure,
    )
    raise resp


ONE_TIME_COOKIE = "gh_once"
SHOWN_FOR_S = 120.0


def _store_key(request: web.Request) -> StoreKey:
    key = request.app[SERVICES].store.key
    if key is None:  # the portal does not start without it (portal.app)
        raise StoreError("the portal's store is open without its store key")
    return key


def _bound(request: web.Request, name: str, until: int) -> str:
    return f"one-time password|{request[SESSION_KEY].id_hash}|{name.lower()}|{until}"


def _take_one_time(request: web.Request, name: str) -> str | None:
    """The one-time password a reset just made, from its sealed cookie: only for the sign-in and account it was made
    for, before it expires; None otherwise (the page then deletes the cookie: shown once)."""
    raw = request.cookies.get(ONE_TIME_COOKIE)
    if not raw:
        return None
    until_text, _, blob = raw.partition(".")
    try:
        until = int(until_text)
        sealed = base64.urlsafe_b64decode(blob.encode())
    except ValueError:
        return None
    if until < time.time():
        return None
    try:
        return _store_key(request).unseal(sealed, _bound(request, name, until))
    except StoreKeyError:
        return None


def setup(app: web.Application) -> None:
    """Add the account routes."""
    app.router.add_routes(routes)
