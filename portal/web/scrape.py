"""Who may read the portal's health details and metrics.

The portal faces the Internet for residents' phones, and its health and metrics name every site and gateway and
tell when an estate's alarm link is down. So ``GET /api/health`` says only ``{"status": "ok"}`` to the public
(enough for a load balancer or an uptime check), and the details and ``GET /metrics`` need either a staff session
(a site-scoped account sees its own sites' gateways) or the scrape token as ``Authorization: Bearer <token>``.

The token is a file of mode 0600: ``scrape_token_file`` in the config, or ``data_dir/scrape.token``, which the
portal creates with a random token at its first start. Prometheus reads it with ``authorization: {type: Bearer,
credentials_file: ...}``.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from pathlib import Path

from aiohttp import web

from common.configfile import ConfigError, read_secret, write_secret
from portal.config import PortalConfig
from portal.web.auth import SESSION_KEY

log = logging.getLogger("portal.scrape")

TOKEN_FILE = "scrape.token"
TOKEN = web.AppKey("portal.scrape_token", str)


def token_path(cfg: PortalConfig) -> Path:
    return Path(cfg.scrape_token_file) if cfg.scrape_token_file else cfg.data_path(TOKEN_FILE)


def load_or_create_token(cfg: PortalConfig) -> str:
    """The scrape token; a configured file must exist, the default one is made (0600) on first use. Blocking.
    Raises :class:`common.configfile.ConfigError` for a file others can read, an unreadable or an empty one."""
    path = token_path(cfg)
    if not cfg.scrape_token_file and not path.exists():
        write_secret(path, (secrets.token_urlsafe(32) + "\n").encode())
        log.info("created the scrape token %s (mode 0600) for Prometheus and health checks", path)
    token = read_secret(path)
    if len(token) < 16:
        raise ConfigError([f"{path}: the scrape token must have at least 16 characters"])
    return token


def authorised(request: web.Request) -> bool:
    """A staff session (its password change done), or the scrape token as a bearer token."""
    session = request.get(SESSION_KEY)
    if session is not None and not session.user.must_change:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    token = request.app[TOKEN]
    return scheme.lower() == "bearer" and bool(given) and hmac.compare_digest(given.strip().encode(), token.encode())
