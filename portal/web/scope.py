"""Site scoping of staff accounts (``users.sites``): which sites' alarms, doors and events a request may see.

An account with ``sites`` NULL sees every site; otherwise only the sites listed. Objects of another site
answer 404, exactly like objects that do not exist, so a scoped account learns nothing of them; lists leave
them out, and a filter naming such a site finds nothing (as for an unknown site).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from portal.web.auth import SESSION_KEY

Sites = tuple[str, ...] | None  # None: every site


def sites_of(request: web.Request) -> Sites:
    """The sites the signed-in staff user may see (None: all); no one signed in sees none."""
    s = request.get(SESSION_KEY)
    if s is None:
        return ()
    return s.user.sites


def sees(request: web.Request, site: str | None) -> bool:
    allowed = sites_of(request)
    return allowed is None or (site is not None and site in allowed)


def need(request: web.Request, site: str | None) -> None:
    """404 unless the user may see ``site`` (the same answer as for something that does not exist)."""
    if not sees(request, site):
        raise web.HTTPNotFound()


def keep(sites: Sites, items: Iterable[Any], key: str = "site") -> list[Any]:
    """The items (dicts) whose ``key`` is one of ``sites``; all of them when ``sites`` is None."""
    if sites is None:
        return list(items)
    return [x for x in items if x.get(key) in sites]


def sql(column: str, sites: Sites) -> tuple[str, list[Any]]:
    """A WHERE condition (and its arguments) limiting ``column`` to ``sites``; ``1 = 1`` for every site."""
    if sites is None:
        return "1 = 1", []
    if not sites:
        return "0 = 1", []
    return f"{column} IN ({', '.join('?' * len(sites))})", list(sites)


#: console message kind → the key of the object it carries (which names its site)
_BODY = {
    "event": "event",
    "incident": "incident",
    "group": "group",
    "arm_command": "command",
    "door": "door",
    "unlock": "command",
    "link": "link",
}


def site_of_message(m: dict[str, Any]) -> str | None:
    """The site a console message is about (None when it names none): the hub filters on it."""
    kind = m.get("kind")
    if kind == "status":
        gw = m.get("gateway")
        return gw.split("/", 1)[0] if isinstance(gw, str) and "/" in gw else None
    body = m.get(_BODY.get(str(kind), ""))
    site = body.get("site") if isinstance(body, dict) else None
    return site if isinstance(site, str) else None
