"""The application factory and the process runner.

Start-up order: store key → store (migrations) → scrape token → first admin → ingest. Shutdown runs the other way:
stop the ingest (no new events), close the console sockets, then commit what is queued and close the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp_jinja2
import jinja2
from aiohttp import web

from common.sdnotify import Notifier
from common.tasks import cancel_and_wait
from portal import alarms, care, centre, doors, estate, grid, openapi, patrol
from portal.config import PortalConfig
from portal.estate import retention
from portal.estate.passes_issue import load_or_create_key
from portal.store import Store, shutdown_executor
from portal.web import limits, scrape, views
from portal.web import setup as web_setup
from portal.web.auth import Auth, middleware, wants_json
from portal.web.bodies import MalformedBody
from portal.web.hub import Hub
from portal.web.ingest import Ingest
from portal.web.metrics import Metrics
from portal.web.ratelimit import real_client
from portal.web.services import SERVICES, Services

log = logging.getLogger("portal")
HERE = Path(__file__).parent
HOUSEKEEPING_S = 600.0

HSTS_MAX_AGE_S = 365 * 86400
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


@dataclass(frozen=True)
class Options:
    """Seams for tests: the wall clock of sessions, the monotonic clock, the jitter source."""

    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random


CONFIG = web.AppKey("portal.config", PortalConfig)
OPTIONS = web.AppKey("portal.options", Options)


def create_app(cfg: PortalConfig, options: Options | None = None) -> web.Application:
    app = web.Application(
        client_max_size=cfg.max_body_bytes,
        # real_client first: every later step (sign-in limits, audit, phone pages) sees the client behind a proxy
        middlewares=[
            real_client(cfg.trusted_proxies),
            _errors,
            limits.middleware(cfg),
            middleware(lambda r: r.app[SERVICES].auth, views.deny),
            views.answers,  # innermost: a page a handler's helper raised (views.Answer) is its answer
        ],
        handler_args={"debug": False},  # aiohttp's own 500 page carries a traceback in asyncio debug mode
    )
    app[CONFIG] = cfg
    app[OPTIONS] = options or Options()
    env = aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters["local"] = views.local_filter
    env.filters["actor"] = views.actor_filter
    env.filters["audit_action"] = views.audit_action_filter
    env.filters["audit_target"] = views.audit_target_filter
    web_setup(app)  # sign-in, staff accounts, stations, the common API
    app.router.add_routes(openapi.routes)
    app.router.add_static("/static/", HERE / "static", name="static", append_version=True)
    app.cleanup_ctx.append(_lifecycle)
    estate.setup(app, wall=app[OPTIONS].clock, mono=app[OPTIONS].monotonic)  # registry, plates, phone pages, plans
    doors.setup(app, wall=app[OPTIONS].clock)  # door list, remote unlock, visitors, access log, revocations
    alarms.setup(app, wall=app[OPTIONS].clock, mono=app[OPTIONS].monotonic)  # alarm board, site map, reports
    care.setup(app, wall=app[OPTIONS].clock, mono=app[OPTIONS].monotonic)  # care for residents living alone
    patrol.setup(app, wall=app[OPTIONS].clock, mono=app[OPTIONS].monotonic)  # guard patrols
    grid.setup(app, wall=app[OPTIONS].clock, mono=app[OPTIONS].monotonic, rand=app[OPTIONS].rand)  # grid platform
    centre.setup(app, wall=app[OPTIONS].clock)  # the estates at a glance; several instances (docs/centre.md)
    app.on_shutdown.append(_on_shutdown)
    app.on_response_prepare.append(_security_headers)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    cfg, opt = app[CONFIG], app[OPTIONS]
    metrics = Metrics()
    cpu = ThreadPoolExecutor(2, thread_name_prefix="portal.cpu")
    try:  # the store key (a missing or foreign one stops the start), the signing key, then the store
        key = await asyncio.get_running_loop().run_in_executor(cpu, cfg.store_key)
        # The portal's signing key (passes, revocation lists, commands), created 0600 on the first start.
        signing_key = await asyncio.get_running_loop().run_in_executor(cpu, load_or_create_key, Path(cfg.data_dir))
        store = Store(
            cfg.store_target,
            batch_max=cfg.store.batch_max,
            queue_max=cfg.store.queue_max,
            observe_commit=metrics.commit_seconds.observe,
            key=key,
        )
        await store.start()
    except BaseException:
        await shutdown_executor(cpu)
        raise
    hub = Hub(queue_max=cfg.ws_queue_max, metrics=metrics)

    def on_events(events: list[dict[str, Any]]) -> None:
        hub.broadcast_events(events)  # other instances hear of stored events with the commit (portal.centre.peers)

    def on_status(site: str, gateway: str, status: str) -> None:
        hub.broadcast({"kind": "status", "gateway": f"{site}/{gateway}", "status": status})

    ingest = Ingest(
        cfg, store, metrics, on_events=on_events, on_status=on_status, rand=opt.rand, signing_key=signing_key
    )
    auth = Auth(cfg, store, cpu, clock=opt.clock, monotonic=opt.monotonic)
    svc = Services(
        cfg=cfg,
        store=store,
        hub=hub,
        ingest=ingest,
        auth=auth,
        metrics=metrics,
        cpu=cpu,
        tz=cfg.tz,
        signing_key=signing_key,
    )
    app[SERVICES] = svc
    housekeeping: asyncio.Task[None] | None = None
    purging: asyncio.Task[None] | None = None
    beats: asyncio.Task[None] | None = None
    try:
        app[scrape.TOKEN] = await asyncio.get_running_loop().run_in_executor(cpu, scrape.load_or_create_token, cfg)
        svc.first_admin_file = await auth.ensure_admin()
        await centre.start(app, svc)  # the other instances hear of everything this one stores from now on
        await ingest.start()
        beats = asyncio.create_task(
            hub.run_beats(cfg.console.heartbeat_s, auth.alive, opt.clock), name="portal.console.beats"
        )
        housekeeping = asyncio.create_task(_housekeeping(auth), name="portal.housekeeping")
        purging = asyncio.create_task(
            retention.daily(
                store, retention.Policy.from_config(cfg), wall=opt.clock, start_delay_s=cfg.retention.start_delay_s
            ),
            name="portal.retention",
        )
        yield
    finally:
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("ingest", ingest.stop),
            ("console sockets", hub.close),
            ("store", store.close),
            ("centre", lambda: centre.stop(app)),  # after the store: its last commits still tell the others
            ("worker threads", lambda: shutdown_executor(cpu)),
        ]
        await cancel_and_wait("timers", [t for t in (beats, housekeeping, purging) if t is not None])
        for name, step in steps:  # each step tried even if an earlier one failed
            try:
                await step()
            except Exception:
                log.exception("stopping the %s failed", name)
        log.info("portal stopped")


async def _on_shutdown(app: web.Application) -> None:
    """Before aiohttp waits for open handlers: stop the producer, then let the sockets go."""
    svc = app.get(SERVICES)
    if svc is None:
        return
    for name, step in (("ingest", svc.ingest.stop), ("console sockets", svc.hub.close)):
        try:
            await step()
        except Exception:
            log.exception("stopping the %s failed", name)


async def _housekeeping(auth: Auth) -> None:
    while True:
        try:
            n = await auth.purge_sessions()
            if n:
                log.info("purged %d expired sessions", n)
        except Exception:
            log.exception("session purge failed")
        await asyncio.sleep(HOUSEKEEPING_S)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    h = response.headers
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("Referrer-Policy", "same-origin")
    h.setdefault("X-Frame-Options", "DENY")
    h.setdefault("Content-Security-Policy", CSP)
    if request.app[CONFIG].cookie_secure:  # served over HTTPS (behind the proxy): browsers stay on HTTPS
        h.setdefault("Strict-Transport-Security", f"max-age={HSTS_MAX_AGE_S}")
    if not request.path.startswith("/static/"):
        h.setdefault("Cache-Control", "no-store")


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """JSON errors for the API, plain pages for people, and never a stack trace."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if wants_json(request):
            if e.content_type == "application/json":
                raise
            slug = (e.reason or "error").lower().replace(" ", "-")
            return web.json_response({"error": slug}, status=e.status)
        if e.status in (403, 404, 405) and SERVICES in request.app:
            key = "error.not_found" if e.status in (404, 405) else "error.forbidden"
            return views.render(request, "error.html", status=e.status, message_key=key)
        raise
    except (asyncio.CancelledError, ConnectionError):
        raise
    except MalformedBody as e:  # raised where the body is read (portal.web.bodies)
        log.info("%s %s: malformed request body: %s", request.method, request.path, e)
        if wants_json(request):
            return web.json_response({"error": "bad-request", "detail": "malformed body"}, status=400)
        return web.Response(status=400, text="400 bad request: malformed body", content_type="text/plain")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _internal(request)


def _internal(request: web.Request) -> web.Response:
    if wants_json(request):
        return web.json_response({"error": "internal"}, status=500)
    return web.Response(status=500, text="500 internal server error", content_type="text/plain")


# ---------------------------------------------------------------- the process


def ready_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


async def serve(cfg: PortalConfig, out: TextIO, *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``). Prints the first-admin line (if any: where the one-time password is)
    and the ready line."""
    limits.require_c_parser()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(cfg)
    runner = web.AppRunner(app, shutdown_timeout=5.0, access_log=logging.getLogger("portal.access"))
    notifier = Notifier()
    watchdog = asyncio.create_task(notifier.feed_watchdog(), name="portal.watchdog")
    try:
        await runner.setup()
        svc = app[SERVICES]
        if svc.first_admin_file:  # before binding: a port in use must not hide where the password is
            out.write(
                json.dumps(
                    {"first_admin": {"user": "admin", "password_file": str(svc.first_admin_file), "must_change": True}}
                )
                + "\n"
            )
            out.flush()
        site = web.TCPSite(runner, cfg.listen.host, cfg.listen.port)
        await site.start()
        port = int(runner.addresses[0][1])
        out.write(json.dumps({"ready": True, "url": ready_url(cfg.listen.host, port)}) + "\n")
        out.flush()
        log.info("portal listening on %s:%d", cfg.listen.host, port)
        notifier.ready(f"listening on {cfg.listen.host}:{port}")
        await stop.wait()
        log.info("stopping")
        notifier.stopping()
    finally:
        watchdog.cancel()
        notifier.close()
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
