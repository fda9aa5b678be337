"""The running parts of one portal, shared by the app factory, the views and the API."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portal.config import PortalConfig
from portal.store import Store
from portal.web.auth import Auth
from portal.web.hub import Hub
from portal.web.ingest import Ingest
from portal.web.metrics import Metrics


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
    #: The portal's Ed25519 signing key (data_dir/pass_signing_key.pem): passes, revocation lists, commands.
    signing_key: Ed25519PrivateKey
    #: Set at start-up when the store had no administrator: the file (mode 0600) holding ``admin``'s one-time password.
    first_admin_file: Path | None = None


SERVICES = web.AppKey("portal.services", Services)
