"""A gateway config's buses and devices as the Modbus driver's specs: the one translation, for the daemon
(gateway.app) and for the installer's live checks (gateway.tooling.commissioning), so both talk to a bus the
same way."""

from __future__ import annotations

from devices.modbus import BusSpec, DeviceSpec
from devices.profiles import find_profile
from gateway.config import BusConfig, DeviceConfig


def bus_spec(b: BusConfig, *, timeout_ms: int | None = None) -> BusSpec:
    """``timeout_ms``: another answer timeout than the config's (a scan's own)."""
    return BusSpec(
        name=b.name,
        kind=b.kind,
        host=b.host,
        port=b.port,
        serial=b.serial,
        baudrate=b.baudrate,
        parity=b.parity,
        stopbits=b.stopbits,
        timeout_ms=timeout_ms or b.timeout_ms,
        retries=b.retries,
        offline_after_misses=b.offline_after_misses,
        inter_frame_ms=b.inter_frame_ms,
        max_in_flight=b.max_in_flight,
    )


def device_spec(d: DeviceConfig, profiles_dir: str | None = None) -> DeviceSpec:
    return DeviceSpec(
        name=d.name, profile=find_profile(d.profile, extra_dir=profiles_dir), unit=d.unit, poll_ms=d.poll_ms
    )
