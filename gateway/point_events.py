"""Point change events: a device point that no zone or door uses, reported as ``point.changed`` with its new value,
for installers (is the wiring right?) and for integrations (a pump's run signal, a tank level). Off by default
(``point_events`` in the gateway's config).

Only changes are reported: the first read of each point after the gateway starts is its baseline, so a restart
does not flood the portal with every point of every device.
Routine priority, group commit; an alarm never depends on them (zones are the alarm path).
"""

from __future__ import annotations

from devices.events import DeviceEvent, PointChanged
from devices.profiles import find_profile
from gateway import wire
from gateway.config import GatewayConfig
from gateway.events import Draft


class PointReporter:
    """Turns the driver's :class:`PointChanged` of the configured devices' unclaimed points into drafts."""

    def __init__(self, cfg: GatewayConfig) -> None:
        pe = cfg.point_events
        wanted = set(pe.devices) if pe.devices else {d.name for d in cfg.devices}
        self.enabled = pe.enabled and bool(wanted)
        claimed: set[tuple[str, str]] = set()
        for z in cfg.zones:
            claimed.add((z.device, z.point))
            if z.aux is not None:
                claimed.update(
                    (z.device, p)
                    for p in (z.aux.tamper, z.aux.fault, z.aux.touch, z.aux.cut, z.aux.short)
                    if p is not None
                )
        for door in cfg.doors:
            claimed.update(
                (door.device, p)
                for p in (door.relay, door.contact, door.exit_button, door.lock_feedback, door.tamper)
                if p is not None
            )
        self._kinds: dict[tuple[str, str], str] = {}
        self._places: dict[str, wire.Place] = {}
        if not self.enabled:
            return
        for d in cfg.devices:
            if d.name not in wanted:
                continue
            p = d.place
            self._places[d.name] = wire.Place(
                site=cfg.site,
                building=p.building if p else None,
                unit=p.unit if p else None,
                house=p.house if p else None,
            )
            for point in find_profile(d.profile, extra_dir=cfg.profiles_dir).points.values():
                if (d.name, point.name) not in claimed:
                    self._kinds[(d.name, point.name)] = point.kind

    def on_device_event(self, ev: DeviceEvent) -> list[Draft]:
        if not self.enabled or not isinstance(ev, PointChanged) or ev.initial:
            return []
        kind = self._kinds.get((ev.device, ev.point))
        if kind is None:
            return []
        return [
            Draft(
                type="point.changed",
                device=ev.device,
                place=self._places[ev.device],
                point=ev.point,
                data={"value": ev.value, "kind": kind},
            )
        ]
