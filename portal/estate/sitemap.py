"""The estate plan as SVG, drawn on the server from the config's coordinates.

Perimeter zones are polylines, buildings rectangles with their names, doors round markers, and markers other
packages place (patrol checkpoints) small diamonds. Each carries a ``data-zone`` / ``data-building`` / ``data-door``
/ ``data-marker`` attribute so the page can mark it live (a marker by the keys in an incident's ``data.markers``);
the server marks
what is alarming when it draws (class ``alarm``: blinks; ``open``: an incident still open but taken care
of), so the plan is right before any script runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from html import escape
from typing import Any

from markupsafe import Markup

from portal.config import SiteMapConfig
from portal.web import i18n


@dataclass
class MapState:
    """What to mark: names of zones, buildings (→ house numbers) and doors, alarming or just open."""

    alarm_zones: set[str] = field(default_factory=set)
    open_zones: set[str] = field(default_factory=set)
    alarm_buildings: dict[str, set[str]] = field(default_factory=dict)
    open_buildings: set[str] = field(default_factory=set)
    alarm_doors: set[str] = field(default_factory=set)
    open_doors: set[str] = field(default_factory=set)
    alarm_markers: set[str] = field(default_factory=set)
    open_markers: set[str] = field(default_factory=set)


def is_alarming(inc: Mapping[str, Any]) -> bool:
    """Blinks: not yet acknowledged, or its condition has not cleared."""
    return inc["state"] == "new" or not inc.get("restored_at")


def map_state(incidents: Iterable[Mapping[str, Any]], site: str) -> MapState:
    st = MapState()
    for inc in incidents:
        if inc["state"] == "closed" or inc["site"] != site:
            continue
        place, data = inc["place"], inc["data"]
        alarm = is_alarming(inc)
        zone = place.get("zone") or data.get("zone")
        if isinstance(zone, str) and zone:
            (st.alarm_zones if alarm else st.open_zones).add(zone)
        building = place.get("building")
        if isinstance(building, str) and building:
            if alarm:
                houses = st.alarm_buildings.setdefault(building, set())
                if place.get("house"):
                    houses.add(str(place["house"]))
            else:
                st.open_buildings.add(building)
        door = place.get("door")
        if isinstance(door, str) and door:
            (st.alarm_doors if alarm else st.open_doors).add(door)
        marks = data.get("markers")
        for key in marks if isinstance(marks, list) else ():
            if isinstance(key, str):
                (st.alarm_markers if alarm else st.open_markers).add(key)
    return st


def _n(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _cls(base: str, name: str, alarm: Iterable[str], open_: Iterable[str]) -> str:
    if name in alarm:
        return f"{base} alarm"
    if name in open_:
        return f"{base} open"
    return base


def render_svg(
    m: SiteMapConfig,
    tr: i18n.Translator,
    state: MapState | None = None,
    door_states: Mapping[str, str] | None = None,
    markers: Iterable[Any] = (),
    image: str | None = None,
) -> Markup:
    """The plan of one site. ``door_states`` maps door names to a live state (closed, open, forced...);
    ``markers``: points with ``key``, ``label``, ``x``, ``y`` and ``kind`` (portal.alarms.board.Marker); ``image``: the
    URL of the plan's picture (an aerial photo, the developer's drawing), drawn under everything."""
    st = state or MapState()
    doors_live = door_states or {}
    size = max(m.width, m.height)
    font = size / 45
    stroke = size / 180
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="sitemap" data-site="{escape(m.site)}" '
        f'viewBox="0 0 {_n(m.width)} {_n(m.height)}" role="img" aria-label="{escape(tr("map.title"))}" '
        f'font-size="{_n(font)}">',
        f'<rect class="ground" x="0" y="0" width="{_n(m.width)}" height="{_n(m.height)}"/>',
    ]
    if image:
        out.append(
            f'<image class="plan" href="{escape(image)}" x="0" y="0" width="{_n(m.width)}" '
            f'height="{_n(m.height)}" preserveAspectRatio="none"/>'
        )
    out.append('<g class="zones">')
    for z in m.zones:
        pts = " ".join(f"{_n(x)},{_n(y)}" for x, y in z.points)
        x0, y0 = z.points[0]
        x1, y1 = z.points[1]
        label = z.label or tr("place.zone", v=z.zone)
        out.append(
            f'<g class="{_cls("zone", z.zone, st.alarm_zones, st.open_zones)}" data-zone="{escape(z.zone)}">'
            f'<title>{escape(label)}</title><polyline points="{pts}" stroke-width="{_n(stroke)}"/>'
            f'<text x="{_n((x0 + x1) / 2)}" y="{_n((y0 + y1) / 2 - stroke * 1.5)}" text-anchor="middle">'
            f"{escape(label)}</text></g>"
        )
    out.append('</g><g class="buildings">')
    for b in m.buildings:
        name = b.name or tr("place.building", v=b.code)
        houses = sorted(st.alarm_buildings.get(b.code, ()))
        house_text = " ".join(tr("place.house", v=h) for h in houses)
        cls = _cls("building", b.code, st.alarm_buildings, st.open_buildings)
        cx, cy = b.x + b.w / 2, b.y + b.h / 2
        out.append(
            f'<g class="{cls}" data-building="{escape(b.code)}"><title>{escape(name)}</title>'
            f'<rect x="{_n(b.x)}" y="{_n(b.y)}" width="{_n(b.w)}" height="{_n(b.h)}" rx="{_n(stroke)}" '
            f'stroke-width="{_n(stroke / 3)}"/>'
            f'<text class="name" x="{_n(cx)}" y="{_n(cy)}" text-anchor="middle" dominant-baseline="middle">'
            f"{escape(name)}</text>"
            f'<text class="houses" x="{_n(cx)}" y="{_n(cy + font * 1.3)}" text-anchor="middle" '
            f'dominant-baseline="middle">{escape(house_text)}</text></g>'
        )
    out.append('</g><g class="doors">')
    for d in m.doors:
        label = d.label or tr("place.door", v=d.door)
        live = doors_live.get(d.door, "")
        live_attr = f' data-state="{escape(live)}"' if live else ""
        out.append(
            f'<g class="{_cls("door", d.door, st.alarm_doors, st.open_doors)}" data-door="{escape(d.door)}"'
            f"{live_attr}><title>{escape(label)}</title>"
            f'<circle cx="{_n(d.x)}" cy="{_n(d.y)}" r="{_n(font * 0.55)}" stroke-width="{_n(stroke / 3)}"/>'
            f'<text x="{_n(d.x + font * 0.8)}" y="{_n(d.y)}" dominant-baseline="middle">{escape(label)}</text></g>'
        )
    out.append('</g><g class="markers">')
    r = font * 0.7
    for mk in markers:
        x, y = float(mk.x), float(mk.y)
        if not (0 <= x <= m.width and 0 <= y <= m.height):
            continue
        cls = _cls(f"marker {escape(str(mk.kind))}", mk.key, st.alarm_markers, st.open_markers)
        out.append(
            f'<g class="{cls}" data-marker="{escape(mk.key)}" data-kind="{escape(str(mk.kind))}">'
            f"<title>{escape(mk.label)}</title>"
            f'<path d="M{_n(x)} {_n(y - r)} L{_n(x + r)} {_n(y)} L{_n(x)} {_n(y + r)} L{_n(x - r)} {_n(y)} Z" '
            f'stroke-width="{_n(stroke / 3)}"/>'
            f'<text x="{_n(x + font * 0.7)}" y="{_n(y)}" dominant-baseline="middle">{escape(mk.label)}</text></g>'
        )
    out.append("</g></svg>")
    return Markup("".join(out))
