"""The running parts of one portal, shared by the app factory, the views and the API."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from aiohttp import web

from portal.auth import Auth
from portal.config import PortalConfig
from portal.hub import Hub
from portal.ingest import Ingest
from portal.metrics import Metrics
from portal.store import Store


@dataclass(eq=False)
class Services:
    cfg: PortalConfig
    store: Store
    hub: Hub
    ingest: Ingest
    auth: Auth
    metrics: Metrics
    cpu: ThreadPoolExecutor
    tz: ZoneInfo
    #: Set at start-up when the store had no users: the one-time password of ``admin``.
    first_admin_password: str | None = None


SERVICES = web.AppKey("portal.services", Services)
