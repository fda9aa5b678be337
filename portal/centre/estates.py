"""The estates at a glance, for the monitoring centre's console: each estate's link, gateways, faults and open alarms.

An estate is a site of the portal's gateway list. Its **link** is what its broker's bridge says of itself: Mosquitto
publishes ``1`` (up) or ``0`` (down, the bridge's last will on the centre's broker) on the bridge's notification
topic, ``gatehouse/bridge/<site>/state`` (:data:`BRIDGE_STATE_FILTER`; systemd/mosquitto-estate-bridge.conf). An
estate whose gateways connect to the centre directly has no bridge: its link is ``direct``. While a bridge is down
the centre hears nothing from the estate, not even its gateways' last wills: their last known status is shown as
it was, under the link's ``down``.

Each instance hears the bridges itself; when it hears a link change state it records the change in the store
(:func:`record`, a ``bridge:<site>`` row of ``store_meta``), unless the store already holds that state: the first
instance to hear a change sets when it happened, and an instance that starts (or starts again) later and hears the
retained state shows that moment too, not its own start (:meth:`Links.since`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from portal.config import PortalConfig
from portal.store import Conn, FnOp, Store, ts_text
from portal.web.scope import Sites
from portal.web.scope import sql as site_sql

log = logging.getLogger("portal.centre")

BRIDGE_STATE_FILTER = "gatehouse/bridge/+/state"
_BRIDGE_TOPIC = re.compile(r"^gatehouse/bridge/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/state$")
#: Priority buckets of open alarms, highest first (gateway.wire.Priority): fire, panic, intrusion, tamper, fault.
BUCKETS: tuple[tuple[str, int], ...] = (
    ("fire", 50),
    ("panic", 40),
    ("intrusion", 30),
    ("tamper", 20),
    ("fault", 10),
    ("routine", 0),
)


def bucket(priority: int) -> str:
    return next(name for name, lo in BUCKETS if priority >= lo)


@dataclass(frozen=True, slots=True)
class Link:
    up: bool
    since: str  # UTC: when the link went so (as heard by this instance, or as stored: first heard by any)


_LINK_ROW = "bridge:"  # store_meta's rows of the links: "bridge:<site>" -> "up <since>" | "down <since>"


def record(conn: Conn, site: str, link: Link) -> None:
    """Store a change of ``site``'s link (call inside a write transaction): nothing when the store already holds
    that state, so the first instance to hear a change sets its time."""
    state = "up" if link.up else "down"
    conn.execute(
        "INSERT INTO store_meta (name, value) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value WHERE store_meta.value NOT LIKE ?",
        (_LINK_ROW + site, f"{state} {link.since}", f"{state} %"),
    )


class Links:
    """Each bridged estate's link, from the bridges' retained state messages (every instance subscribes)."""

    def __init__(
        self,
        known_sites: set[str],
        wall: Callable[[], float] = time.time,
        on_change: Callable[[str, str], None] | None = None,
        store: Store | None = None,
    ) -> None:
        self.known = known_sites
        self.wall = wall
        self.on_change = on_change  # (site, "up" | "down"): the consoles are told, once the change is stored
        self.store = store  # where changes are recorded (None: nowhere, this instance's times only)
        self.links: dict[str, Link] = {}
        self.rejected = 0

    def on_message(self, topic: str, payload: bytes) -> None:
        m = _BRIDGE_TOPIC.match(topic)
        if m is None or m.group(1) not in self.known or payload.strip() not in (b"0", b"1"):
            self.rejected += 1
            if self.rejected == 1:
                log.warning("ignored a bridge state %r on %s (an unknown estate or not 0/1)", payload[:20], topic)
            return
        site, up = m.group(1), payload.strip() == b"1"
        old = self.links.get(site)
        if old is None or old.up != up:
            link = self.links[site] = Link(up, ts_text(datetime.fromtimestamp(self.wall(), UTC)))
            (log.info if up else log.warning)("estate %s: bridge %s", site, "up" if up else "down")

            def tell(_: object = None) -> None:
                if self.on_change is not None:
                    self.on_change(site, "up" if up else "down")

            stored = self.store.enqueue_nowait(FnOp(lambda c: record(c, site, link))) if self.store else None
            if stored is None:  # no store, or it is closed or full: this instance's time until the next change
                tell()
            else:
                stored.add_done_callback(tell)

    def state(self, site: str) -> str:
        link = self.links.get(site)
        return "direct" if link is None else ("up" if link.up else "down")

    def since(self, site: str, stored: Mapping[str, Link]) -> str | None:
        """When ``site``'s link went as this instance hears it now: the stored time of that state (first heard by
        any instance), else (not stored yet) when this instance heard it; None for a direct estate."""
        link = self.links.get(site)
        if link is None:
            return None
        kept = stored.get(site)
        return kept.since if kept is not None and kept.up == link.up else link.since


def read(conn: Conn, sites: Sites) -> dict[str, Any]:
    """What the store holds for the overview: gateways' rows, open incidents by site, priority and state, the
    registry's estate names and the links' last changes (:func:`record`)."""
    where, args = site_sql("site", sites)
    gateways = [
        dict(zip(r.keys(), tuple(r), strict=True))
        for r in conn.execute(
            "SELECT site, gateway, status, status_changed_at, last_event_at, contiguous_seq, max_seq, open_gaps"
            f" FROM gateways WHERE {where}",
            args,
        )
    ]
    open_rows = conn.execute(
        "SELECT site, priority, state, count(*) AS n, min(opened_at) AS oldest, max(escalated_at) AS escalated"
        f" FROM incidents WHERE state <> 'closed' AND {where} GROUP BY site, priority, state",
        args,
    ).fetchall()
    names: dict[str, str] = {}
    try:
        names = {r[0]: r[1] for r in conn.execute("SELECT code, name FROM reg_sites")}
    except Exception:  # a store without the registry's tables: codes only
        names = {}
    links: dict[str, Link] = {}
    for name, value in conn.execute("SELECT name, value FROM store_meta WHERE name LIKE ?", (_LINK_ROW + "%",)):
        site = str(name)[len(_LINK_ROW) :]
        state, _, since = str(value).partition(" ")
        if sites is None or site in sites:
            links[site] = Link(state == "up", since)
    return {"gateways": gateways, "open": [tuple(r) for r in open_rows], "names": names, "links": links}


def overview(
    cfg: PortalConfig, sites: Sites, stored: Mapping[str, Any], links: Links, faults: Mapping[tuple[str, str], str]
) -> list[dict[str, Any]]:
    """One item per estate the user may see: link, online, gateways (faults first), open alarms by priority.
    Sorted as a centre watches them: unacknowledged alarms first, then estates that are down, then by name."""
    rows = {(g["site"], g["gateway"]): g for g in stored["gateways"]}
    estates: dict[str, dict[str, Any]] = {}
    for ref in cfg.gateways:
        if sites is not None and ref.site not in sites:
            continue
        e = estates.setdefault(
            ref.site,
            {
                "site": ref.site,
                "name": stored["names"].get(ref.site) or ref.site,
                "link": links.state(ref.site),
                "link_since": links.since(ref.site, stored["links"]),
                "gateways": [],
                "open": {b: 0 for b, _ in BUCKETS},
                "unacknowledged": 0,
                "escalated": 0,
                "oldest_unacknowledged": None,
            },
        )
        row = rows.get((ref.site, ref.gateway), {})
        status = str(row.get("status") or "unknown")
        fault = faults.get((ref.site, ref.gateway), "") if status == "online" else ""
        e["gateways"].append(
            {
                "gateway": ref.gateway,
                "label": ref.name or ref.gateway,
                "status": "fault" if fault else status,
                "fault": fault[:200],
                "since": row.get("status_changed_at"),
                "last_event_at": row.get("last_event_at"),
            }
        )
    for site, priority, state, n, oldest, escalated in stored["open"]:
        est = estates.get(site)
        if est is None:
            continue
        est["open"][bucket(int(priority))] += int(n)
        if state == "new":
            est["unacknowledged"] += int(n)
            if est["oldest_unacknowledged"] is None or oldest < est["oldest_unacknowledged"]:
                est["oldest_unacknowledged"] = oldest
            if escalated:
                est["escalated"] += int(n)
    for e in estates.values():
        gws = e["gateways"]
        gws.sort(key=lambda g: (g["status"] not in ("fault", "offline"), g["gateway"]))
        e["gateways_online"] = sum(1 for g in gws if g["status"] in ("online", "fault"))
        e["gateways_total"] = len(gws)
        e["faults"] = [g for g in gws if g["status"] in ("fault", "offline")]
        e["online"] = e["link"] != "down" and e["gateways_online"] > 0
        e["open_total"] = sum(e["open"].values())
    return sorted(estates.values(), key=lambda e: (-e["unacknowledged"], e["online"], e["name"], e["site"]))
