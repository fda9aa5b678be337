"""`gatehouse`'s subcommands for the installer (init, device, bus, walktest, status, broker) and the handovers
to the portal, the stubs and the demo. ``gatehouse gateway run`` is :mod:`gateway.cli`'s own, so the daemon
loads nothing of this package.

The portal and the stubs are separate programs (``python -m portal``, ``python -m firmware_stubs.X``);
this command hands over to them with exec, as production's systemd units do, rather than importing them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from gateway import __version__
from gateway.daemon import run_gateway, setup_logging
from gateway.tooling.output import print_table

STUBS = {
    "perimeter": "firmware_stubs.perimeter_panel",
    "indoor": "firmware_stubs.indoor_panel",
    "door": "firmware_stubs.door_controller",
    "reader": "firmware_stubs.qr_reader",
}


def _exec_module(module: str, args: Sequence[str]) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def cmd_gateway_run(ns: argparse.Namespace) -> int:
    return run_gateway(ns.config)


def cmd_config_check(ns: argparse.Namespace) -> int:
    from gateway import config

    try:
        cfg = config.load(ns.config, check_files=True)
    except config.ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 2
    print(f"{ns.config}: ok ({len(cfg.buses)} buses, {len(cfg.devices)} devices, {len(cfg.zones)} zones)")
    return 0


def _fail(prefix: str, e: Exception) -> int:
    print(f"{prefix}: {e}", file=sys.stderr)
    for p in getattr(e, "problems", []):
        print(f"  {p}", file=sys.stderr)
    return 2


def _read_password(path: str | None) -> str | None:
    if path is None:
        return None
    if path == "-":
        return sys.stdin.readline().rstrip("\r\n")
    return Path(path).read_text(encoding="utf-8").strip()


def cmd_init(ns: argparse.Namespace) -> int:
    from gateway.tooling import provision

    try:
        password = _read_password(ns.mqtt_password_file)
        res = provision.init_gateway(
            ns.config,
            site=ns.site,
            gateway=ns.gateway,
            broker=ns.broker,
            mqtt_password=password,
            pass_keys=[ns.pass_key] if ns.pass_key else [],
            tls_ca=ns.tls_ca,
            data_dir=ns.data_dir,
            owner=ns.owner,
            force=ns.force,
        )
    except (provision.ProvisionError, OSError) as e:
        return _fail("init", e)
    for p in res.written:
        print(f"wrote {p}")
    user = provision.broker_user(ns.site, ns.gateway)
    if res.generated_password is not None:
        print(f"MQTT password for broker user {user!r} (shown once; also in the secrets file):")
        print(f"  {res.generated_password}")
        print(f"register it on the broker host: sudo gatehouse broker add-user {user} --password-file -")
    print(f"next: gatehouse device add --config {ns.config} NAME --profile P --unit N --serial /dev/ttyUSB0")
    return 0


def _bus_request(ns: argparse.Namespace) -> Any:
    from gateway.tooling.provision import BusRequest

    return BusRequest(
        name=ns.bus,
        serial=ns.serial,
        tcp=ns.tcp,
        rtu_over_tcp=ns.rtu_over_tcp,
        baudrate=ns.baud,
        parity=ns.parity,
        stopbits=ns.stopbits,
        timeout_ms=ns.timeout_ms,
    )


def cmd_device_add(ns: argparse.Namespace) -> int:
    from gateway.tooling import provision

    try:
        res = provision.add_device(
            ns.config,
            ns.name,
            profile=ns.profile,
            unit=ns.unit,
            bus=_bus_request(ns),
            poll_ms=ns.poll_ms,
            place=ns.place,
            zones=ns.zone,
            doors=ns.door,
        )
    except provision.ProvisionError as e:
        return _fail("device add", e)
    new = " (new bus)" if res.bus_created else ""
    print(f"added device {res.device!r} on bus {res.bus!r}{new}, unit {ns.unit}, profile {ns.profile}")
    for z in res.zones:
        print(f"  zone {z}")
    for d in res.doors:
        print(f"  door {d}")
    print("restart the gateway to use it: sudo systemctl restart gatehouse-gateway")
    return 0


def cmd_device_remove(ns: argparse.Namespace) -> int:
    from gateway.tooling import provision

    try:
        res = provision.remove_device(ns.config, ns.name, keep_bus=ns.keep_bus)
    except provision.ProvisionError as e:
        return _fail("device remove", e)
    print(f"removed device {res.device!r}")
    for z in res.zones:
        print(f"  and zone {z}")
    for d in res.doors:
        print(f"  and door {d}")
    if res.bus_removed:
        print(f"  and bus {res.bus_removed} (nothing else was on it)")
    return 0


def _load_for_reading(path: str) -> Any:
    from gateway import config

    try:
        return config.load(path)
    except config.ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return None


def cmd_device_list(ns: argparse.Namespace) -> int:
    from gateway.tooling import provision

    cfg = _load_for_reading(ns.config)
    if cfg is None:
        return 2
    rows = provision.describe_devices(cfg)
    if ns.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    if not rows:
        print("no devices; add one with `gatehouse device add`")
        return 0
    table = [("NAME", "PROFILE", "BUS", "UNIT", "ENDPOINT", "PLACE", "ZONES", "DOORS")]
    for r in rows:
        table.append(
            (
                r["name"],
                r["profile"],
                r["bus"],
                str(r["unit"]),
                r["endpoint"],
                r["place"] or "-",
                ",".join(z["name"] for z in r["zones"]) or "-",
                ",".join(d["name"] for d in r["doors"]) or "-",
            )
        )
    print_table(table)
    return 0


def cmd_device_show(ns: argparse.Namespace) -> int:
    from gateway.tooling import provision

    cfg = _load_for_reading(ns.config)
    if cfg is None:
        return 2
    rows = {r["name"]: r for r in provision.describe_devices(cfg)}
    r = rows.get(ns.name)
    if r is None:
        print(f"device show: no device {ns.name!r} (devices: {', '.join(rows) or 'none'})", file=sys.stderr)
        return 2
    try:
        r["points"] = list(provision.iter_profile_points(r["profile"], cfg.profiles_dir))
    except provision.ProvisionError as e:
        return _fail("device show", e)
    if ns.json:
        print(json.dumps(r, ensure_ascii=False, indent=2))
        return 0
    print(f"device {r['name']}: profile {r['profile']}, unit {r['unit']}, poll every {r['poll_ms']} ms")
    print(f"  bus {r['bus']} ({r['kind']} {r['endpoint']})")
    print(f"  place {r['place'] or '-'}")
    used = {z["point"]: f"zone {z['name']} ({z['type']})" for z in r["zones"]}
    for d in r["doors"]:
        used[d["relay"]] = f"door {d['name']} relay"
        if d["contact"]:
            used[d["contact"]] = f"door {d['name']} contact"
        if d["exit_button"]:
            used[d["exit_button"]] = f"door {d['name']} exit button"
    table = [("POINT", "TABLE", "ADDRESS", "TYPE", "KIND", "RW", "USED BY")]
    for p in r["points"]:
        table.append(
            (
                p["name"],
                p["table"],
                str(p["address"]),
                p["dtype"],
                p["kind"],
                "rw" if p["writable"] else "r",
                used.get(p["name"], "-"),
            )
        )
    print_table(table, indent="  ")
    return 0


def cmd_broker_add_user(ns: argparse.Namespace) -> int:
    from gateway.tooling import provision

    try:
        password = _read_password(ns.password_file)
        pw = provision.add_broker_user(ns.passwd_file, ns.user, password=password, force=ns.force)
    except (provision.ProvisionError, OSError) as e:
        return _fail("broker add-user", e)
    print(f"broker user {ns.user!r} written to {ns.passwd_file}")
    if password is None:
        print(f"password (shown once; put it in the gateway's secrets/mqtt.password, mode 0600):\n  {pw}")
    print("reload the broker to use it: sudo systemctl reload mosquitto")
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    url = ns.url
    if ns.config:
        cfg = _load_for_reading(ns.config)
        if cfg is None:
            return 2
        if not cfg.local_api.enabled:
            print(f"status: local_api is disabled in {ns.config}", file=sys.stderr)
            return 2
        url = f"http://{_connect_host(cfg.local_api.host)}:{cfg.local_api.port}"
    url = (url or "http://127.0.0.1:9880").rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=ns.timeout) as r:
            data = json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        print(f"status: {url}/status answered HTTP {e.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        print(
            f"status: cannot reach the gateway at {url}: {reason} (is it running? "
            "sudo systemctl status gatehouse-gateway; is local_api enabled in its config?)",
            file=sys.stderr,
        )
        return 1
    except ValueError as e:
        print(f"status: {url}/status did not answer JSON: {e}", file=sys.stderr)
        return 1
    if ns.config:
        # Every config defaults to port 9880: a second gateway on the same machine cannot bind it, and its
        # status would be the first one's. Say so rather than show another gateway's buses as this one's.
        who = f"{data.get('site')}/{data.get('gateway')}" if isinstance(data, dict) else "?"
        if who != f"{cfg.site}/{cfg.gateway}":
            print(
                f"status: the gateway answering at {url} is {who}, not {cfg.site}/{cfg.gateway} of {ns.config}: "
                f"another gateway holds local_api port {cfg.local_api.port} (give each gateway on this machine "
                f"its own local_api.port); {cfg.site}/{cfg.gateway} may not be running, or could not open its "
                "local API (see its journal)",
                file=sys.stderr,
            )
            return 1
    if ns.json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        print(format_status(data))
    return 0


def _connect_host(host: str) -> str:
    """The address to reach a server bound to ``host``: loopback for a wildcard, brackets for IPv6."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _ago(s: float | None) -> str:
    if s is None:
        return "never"
    s = max(0.0, float(s))
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    if s < 172800:
        return f"{s / 3600:.1f}h ago"
    return f"{s / 86400:.1f}d ago"


def _duration(s: float) -> str:
    s = int(s)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    return f"{d}d{h}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


def format_status(d: dict[str, Any]) -> str:
    """The human view of ``GET /status``."""
    b = d["broker"]
    out = [
        f"gateway  {d['site']}/{d['gateway']}  version {d['version']}  up {_duration(d['uptime_s'])}  "
        f"{'ready' if d['ready'] else 'STARTING'}"
    ]
    link = "connected" if b["connected"] else "DISCONNECTED"
    out.append(
        f"broker   {b['host']}:{b['port']} {link} ({b['connects']} connects), "
        f"last ack {_ago(b['last_ack_s_ago'])}, {b['events_sent']} events sent, {b['resends']} resends"
    )
    depth = d["outbox_depth"]
    out.append(f"outbox   {'unreadable' if depth is None else depth} events waiting for the portal")
    st = d["store"]
    out.append(
        f"store    {'FAULT: ' + st['fault'] if st['fault'] else 'ok'} (last seq {st['last_seq']}, "
        f"{st['pending']} pending, {st['dropped']} dropped)"
    )
    ev = d["last_event"]
    if ev:
        where = ev["device"] + (f".{ev['point']}" if ev.get("point") else "")
        out.append(f"last     #{ev['seq']} {ev['type']} {where} {_ago(ev['age_s'])} ({ev['ts']})")
    else:
        out.append("last     no event yet")
    c = d["devices"]
    out.append(f"devices  {c.get('online', 0)} online, {c.get('offline', 0)} offline, {c.get('unknown', 0)} unknown")
    for bus in d["buses"]:
        out.append("")
        out.append(
            f"bus {bus['name']}  {bus['kind']} {bus['endpoint']}  "
            f"{'connected' if bus['connected'] else 'DOWN'} ({bus['link_drops']} drops)"
            + (f"  STUCK: poll loop silent {bus['stalled_s']:.0f} s" if bus.get("stalled_s") is not None else "")
        )
        rows = [("  DEVICE", "UNIT", "STATE", "POLLS/S", "POLL MS", "MISSED", "ERRORS", "LATENCY", "LAST OK")]
        for x in bus["devices"]:
            rate = "-" if x["poll_rate_hz"] is None else f"{x['poll_rate_hz']:.1f}"
            errs = sum(x["errors"].values())
            lat = "-" if x["last_latency_ms"] is None else f"{x['last_latency_ms']:.0f} ms"
            state = x["state"] if x["state"] != "offline" else "OFFLINE"
            rows.append(
                (
                    f"  {x['name']}",
                    str(x["unit"]),
                    state,
                    rate,
                    str(x["poll_ms"] or "-"),
                    str(x["missed_polls"]),
                    str(errs),
                    lat,
                    _ago(x["last_ok_s_ago"]),
                )
            )
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            print_table(rows)
        out.append(buf.getvalue().rstrip("\n"))
    for ln in d.get("lines", []):
        n = ln["counts"]
        rejected = sum(v for k, v in n.items() if k.startswith("rejected_"))
        state = ln["state"] if ln["state"] != "offline" else "OFFLINE"
        out.append("")
        out.append(
            f"line {ln['name']}  contact-id {ln['mode']}  {state}  {n.get('reports', 0)} reports, "
            f"{n.get('heartbeats', 0)} heartbeats, {rejected} rejected, {n.get('losses', 0)} port losses"
        )
    return "\n".join(out)


def _busy_check(bus: Any) -> None:
    """A live check opens the port itself: refuse it while another program (the daemon) holds it."""
    from gateway.tooling import provision

    if bus.kind == "modbus-rtu" and bus.serial:
        provision.check_serial_port(bus.serial, check_busy=True)


def cmd_bus_scan(ns: argparse.Namespace) -> int:
    from devices.modbus import BusDown, BusSpec
    from devices.profiles import ProfileError
    from gateway.tooling import commissioning as cm
    from gateway.tooling import provision
    from gateway.tooling import scan as sc

    extra_dir = None
    try:
        units = sc.parse_units(ns.units)
        if ns.bus:
            if not ns.config:
                raise provision.ProvisionError("--bus needs --config")
            cfg = _load_for_reading(ns.config)
            if cfg is None:
                return 2
            extra_dir = cfg.profiles_dir
            bus = next((b for b in cfg.buses if b.name == ns.bus), None)
            if bus is None:
                raise provision.ProvisionError(
                    f"no bus {ns.bus!r} in {ns.config} (buses: {', '.join(b.name for b in cfg.buses) or 'none'})"
                )
            _busy_check(bus)
            spec = cm.bus_spec(bus, timeout_ms=ns.timeout_ms)
        elif ns.serial:
            provision.check_serial_port(ns.serial, check_busy=True)
            spec = BusSpec(
                "scan",
                "modbus-rtu",
                serial=ns.serial,
                baudrate=ns.baud or 9600,
                parity=ns.parity or "N",
                stopbits=ns.stopbits or 1,
                timeout_ms=ns.timeout_ms,
                retries=0,
            )
        elif ns.tcp:
            host, port = provision.parse_host_port(ns.tcp, "--tcp")
            spec = BusSpec(
                "scan",
                "modbus-rtu-over-tcp" if ns.rtu_over_tcp else "modbus-tcp",
                host=host,
                port=port,
                timeout_ms=ns.timeout_ms,
                retries=0,
            )
        else:
            raise provision.ProvisionError("say where to scan: --serial PORT, --tcp HOST:PORT, or --config C --bus B")
        profiles = sc.profiles_for_scan(ns.profile, extra_dir)
    except (provision.ProvisionError, ValueError, ProfileError) as e:
        return _fail("bus scan", e)
    where = spec.endpoint() + (f" {spec.baudrate} 8{spec.parity}{spec.stopbits}" if spec.kind == "modbus-rtu" else "")
    if not 1 <= ns.tries <= 10:
        return _fail("bus scan", ValueError("--tries must be 1-10"))
    print(
        f"scanning {where} for unit ids {units[0]}-{units[-1]} ({len(units)} ids, {spec.timeout_ms} ms each, "
        f"{ns.tries} tries); profiles: {', '.join(p.name for p in profiles)}",
        file=sys.stderr,
    )
    setup_logging("ERROR")
    try:
        show = sc.ScanProgress(sys.stderr, worst_s_per_id=ns.tries * (spec.timeout_ms + spec.gap_ms) / 1000)
        result = asyncio.run(sc.scan(spec, units, profiles, progress=show.progress, tries=ns.tries, found=show.found))
    except BusDown as e:
        return _fail("bus scan", e)
    rows = [
        {
            "unit": h.unit,
            "profile": h.profile,
            "registers": list(h.registers),
            "detail": h.detail,
            "candidates": list(h.candidates),
            "probes": list(h.probes),
            "requests": h.requests,
        }
        for h in result.hits
    ]
    if ns.json:
        print(
            json.dumps(
                {
                    "endpoint": spec.endpoint(),
                    "scanned": result.scanned,
                    "seconds": round(result.seconds, 2),
                    "found": rows,
                },
                indent=2,
            )
        )
        return 0 if rows else 1
    print(f"scanned {result.scanned} ids in {result.seconds:.1f} s: {len(rows)} answered")
    if not rows:
        hint = (
            (
                "check the wiring (A and B swapped?), the termination, and the baud rate: every id timing out "
                "usually means a wrong speed (try --baud 19200, 38400, 4800 ...)"
            )
            if spec.kind == "modbus-rtu"
            else ("check the address and that the device speaks this framing (--rtu-over-tcp for a serial server)")
        )
        print(f"no unit answered on {where}: {hint}", file=sys.stderr)
        return 1
    table = [("UNIT", "PROFILE", "DETAIL")]
    for h in result.hits:
        missed = f"answered request {h.requests}" if h.requests > 1 else ""
        detail = "; ".join(x for x in (h.detail, missed) if x) or "-"
        table.append((str(h.unit), h.profile or ("ambiguous" if h.candidates else "?"), detail))
    print_table(table)
    for h in result.hits:
        if h.candidates:
            print(f"unit {h.unit}: probes asked: {'; '.join(h.probes) or 'none'}")
    return 0


def cmd_device_test(ns: argparse.Namespace) -> int:
    from gateway.tooling import commissioning as cm
    from gateway.tooling import provision

    cfg = _load_for_reading(ns.config)
    if cfg is None:
        return 2
    dev = next((d for d in cfg.devices if d.name == ns.name), None)
    if dev is None:
        print(
            f"device test: no device {ns.name!r} (devices: {', '.join(d.name for d in cfg.devices) or 'none'})",
            file=sys.stderr,
        )
        return 2
    bus = next(b for b in cfg.buses if b.name == dev.bus)
    try:
        _busy_check(bus)
    except provision.ProvisionError as e:
        return _fail("device test", e)
    setup_logging("ERROR")  # the bus engine's warnings would repeat what the test reports itself
    return asyncio.run(
        cm.run_device_test(cfg, dev, bus, wait=ns.wait, pulse=ns.pulse, ms=ns.ms, trip=ns.trip, countdown=ns.countdown)
    )


def cmd_walktest(ns: argparse.Namespace) -> int:
    from gateway.tooling import commissioning as cm
    from gateway.tooling import provision

    cfg = _load_for_reading(ns.config)
    if cfg is None:
        return 2
    zones = [z.strip() for z in ns.zones.split(",")] if ns.zones else None
    if zones:
        unknown = sorted(set(zones) - {z.name for z in cfg.zones})
        if unknown:
            print(f"walktest: no zone {', '.join(map(repr, unknown))} in {ns.config}", file=sys.stderr)
            return 2
    items = cm.walk_items(cfg, zones, doors=not ns.no_doors)
    if not items:
        print(
            f"walktest: nothing to test: {ns.config} has no zones and no doors with a contact or exit button",
            file=sys.stderr,
        )
        return 2
    try:
        for b in cfg.buses:
            if any(d.bus == b.name and d.name in {it.device for it in items} for d in cfg.devices):
                _busy_check(b)
    except provision.ProvisionError as e:
        return _fail("walktest", e)
    setup_logging("ERROR")
    return asyncio.run(
        cm.run_walk_test(
            cfg, items, wait=ns.wait, give_up_s=ns.timeout, by=ns.by or "", report=ns.report, english=ns.english
        )
    )


def cmd_demo(ns: argparse.Namespace) -> int:
    from gateway import demo

    setup_logging("INFO")
    data = Path(ns.data).resolve()
    (data / "logs").mkdir(parents=True, exist_ok=True)
    return asyncio.run(demo.run_demo(ns, data))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gatehouse", description="Gatehouse estate access control and alarms")
    p.add_argument("--version", action="version", version=f"gatehouse {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    gw = sub.add_parser("gateway", help="the gateway daemon").add_subparsers(dest="action", required=True)
    run = gw.add_parser("run", help="run the gateway until SIGTERM")
    run.add_argument("--config", required=True)
    run.set_defaults(func=cmd_gateway_run)

    pt = sub.add_parser("portal", help="the estate portal (web console)")
    pt.add_argument(
        "portal_args",
        nargs=argparse.REMAINDER,
        help="run | check | adduser | import-estate | export-estate | plates (each with --config FILE)",
    )
    pt.set_defaults(func=lambda ns: _exec_module("portal", ns.portal_args))

    st = sub.add_parser("stub", help="simulated hardware: " + ", ".join(STUBS))
    st.add_argument("kind", choices=sorted(STUBS))
    st.add_argument("stub_args", nargs=argparse.REMAINDER)
    st.set_defaults(func=lambda ns: _exec_module(STUBS[ns.kind], ns.stub_args))

    cfg = sub.add_parser("config", help="configuration files").add_subparsers(dest="action", required=True)
    chk = cfg.add_parser("check", help="validate a gateway config; each error names its file and line")
    chk.add_argument("config")
    chk.set_defaults(func=cmd_config_check)

    ini = sub.add_parser("init", help="write a new gateway config with its secrets (MQTT password, keys)")
    ini.add_argument("--config", required=True, help="the config file to write, e.g. /etc/gatehouse/gateway.yaml")
    ini.add_argument("--site", required=True, help="the estate's name on MQTT topics")
    ini.add_argument("--gateway", required=True, help="this gateway's name (its broker user is SITE/GATEWAY)")
    ini.add_argument("--broker", default="127.0.0.1:1883", help="the MQTT broker, host:port (default %(default)s)")
    ini.add_argument(
        "--mqtt-password-file",
        default=None,
        help="file holding the broker password ('-' reads one line from stdin); default: generate one",
    )
    ini.add_argument(
        "--pass-key",
        default=None,
        help="the portal's signing PUBLIC key (PEM: passes, revocation lists, commands); copied to keys/",
    )
    ini.add_argument("--tls-ca", default=None, help="the broker's CA certificate (PEM); copied to keys/, enables TLS")
    ini.add_argument("--data-dir", default="/var/lib/gatehouse", help="where the store lives (default %(default)s)")
    ini.add_argument("--owner", default=None, help="user[:group] to own the secrets (the service user: gatehouse)")
    ini.add_argument("--force", action="store_true", help="replace existing files")
    ini.set_defaults(func=cmd_init)

    dev = sub.add_parser("device", help="devices in a gateway config").add_subparsers(dest="action", required=True)
    add = dev.add_parser("add", help="add a device by profile, bus and unit id (zones and doors mapped to points)")
    add.add_argument("name")
    add.add_argument("--config", required=True)
    add.add_argument("--profile", required=True, help="device profile (devices/profiles/*.yaml or profiles_dir)")
    add.add_argument("--unit", type=int, required=True, help="Modbus unit id, 1-247")
    add.add_argument("--bus", default=None, help="an existing bus by name, or the name for a new one")
    add.add_argument("--serial", default=None, help="serial port of an RS-485/RS-232 bus, e.g. /dev/ttyUSB0")
    add.add_argument("--tcp", default=None, help="host:port of a Modbus TCP device or serial server")
    add.add_argument("--rtu-over-tcp", action="store_true", help="the TCP endpoint is a transparent serial server")
    add.add_argument("--baud", type=int, default=None, choices=[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200])
    add.add_argument("--parity", default=None, choices=["N", "E", "O"])
    add.add_argument("--stopbits", type=int, default=None, choices=[1, 2])
    add.add_argument("--timeout-ms", type=int, default=None, help="answer timeout of a new bus")
    add.add_argument("--poll-ms", type=int, default=None, help="poll interval (default 200 ms)")
    add.add_argument("--place", default=None, help="BUILDING[/UNIT[/HOUSE]] where it is, e.g. 3/2 or 3/2/1201")
    add.add_argument(
        "--zone",
        action="append",
        default=[],
        metavar="POINT=NAME[,type=T][,label=L][,group=G][,invert]",
        help="a zone on one of its points (repeatable); type: perimeter (default), entry, interior, ...",
    )
    add.add_argument(
        "--door",
        action="append",
        default=[],
        metavar="RELAY=NAME[,contact=P][,exit=P][,gate][,label=L]",
        help="a door released by one of its relays (repeatable)",
    )
    add.set_defaults(func=cmd_device_add)
    ls = dev.add_parser("list", help="devices with their bus, place, zones and doors")
    ls.add_argument("--config", required=True)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_device_list)
    show = dev.add_parser("show", help="one device and every point of its profile")
    show.add_argument("name")
    show.add_argument("--config", required=True)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_device_show)
    rm = dev.add_parser("remove", help="remove a device with its zones and doors")
    rm.add_argument("name")
    rm.add_argument("--config", required=True)
    rm.add_argument("--keep-bus", action="store_true", help="keep its bus even if nothing else is on it")
    rm.set_defaults(func=cmd_device_remove)

    tst = dev.add_parser("test", help="read every point live, pulse a relay, trip-test a zone (gateway stopped)")
    tst.add_argument("name")
    tst.add_argument("--config", required=True)
    tst.add_argument("--pulse", default=None, metavar="RELAY", help="pulse this relay output")
    tst.add_argument("--ms", type=int, default=1000, help="pulse length (default %(default)s ms)")
    tst.add_argument("--trip", default=None, metavar="ZONE|POINT", help="wait for this zone (or point) to trip")
    tst.add_argument("--countdown", type=int, default=30, help="seconds to wait for the trip (default %(default)s)")
    tst.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the first answers")
    tst.set_defaults(func=cmd_device_test)

    bus = sub.add_parser("bus", help="RS-485 buses and TCP serial servers").add_subparsers(dest="action", required=True)
    scn = bus.add_parser("scan", help="probe unit ids and say which profile answers (gateway stopped)")
    scn.add_argument("--serial", default=None, help="serial port, e.g. /dev/ttyUSB0")
    scn.add_argument("--tcp", default=None, help="host:port of a Modbus TCP gateway or serial server")
    scn.add_argument("--rtu-over-tcp", action="store_true", help="the TCP endpoint is a transparent serial server")
    scn.add_argument("--config", default=None, help="with --bus: scan a bus of this gateway config")
    scn.add_argument("--bus", default=None, help="a bus of --config")
    scn.add_argument("--baud", type=int, default=None, choices=[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200])
    scn.add_argument("--parity", default=None, choices=["N", "E", "O"])
    scn.add_argument("--stopbits", type=int, default=None, choices=[1, 2])
    scn.add_argument("--units", default="1-247", help="ids to probe: 1-247, 5, 1,3,10-20 (default %(default)s)")
    scn.add_argument("--timeout-ms", type=int, default=100, help="wait per request (default %(default)s ms)")
    scn.add_argument(
        "--tries", type=int, default=2, help="requests to a silent id before it is taken as empty (default %(default)s)"
    )
    scn.add_argument("--profile", action="append", default=None, help="only these profiles (repeatable)")
    scn.add_argument("--json", action="store_true")
    scn.set_defaults(func=cmd_bus_scan)

    wt = sub.add_parser("walktest", help="trip each zone and door in turn; writes a commissioning report (HTML)")
    wt.add_argument("--config", required=True)
    wt.add_argument("--zones", default=None, help="only these zones, comma-separated")
    wt.add_argument("--no-doors", action="store_true", help="zones only")
    wt.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds (default 30 min)")
    wt.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the devices' first answers")
    wt.add_argument("--report", default=None, help="the report file (default walktest-SITE-GATEWAY-DATE.html)")
    wt.add_argument("--by", default=None, help="the installer's name, for the report")
    wt.add_argument("--english", action="store_true", help="English beside the Chinese in the report")
    wt.set_defaults(func=cmd_walktest)

    brk = sub.add_parser("broker", help="the Mosquitto broker's credentials").add_subparsers(
        dest="action", required=True
    )
    au = brk.add_parser("add-user", help="add a gateway (user SITE/GATEWAY) or the portal (user 'portal')")
    au.add_argument("user", help="SITE/GATEWAY for a gateway (e.g. sunny-gardens/gw-b3), or portal")
    au.add_argument("--passwd-file", default="/etc/mosquitto/gatehouse.passwd", help="default %(default)s")
    au.add_argument("--password-file", default=None, help="file with the password ('-': stdin); default: generate")
    au.add_argument("--force", action="store_true", help="give an existing user a new password")
    au.set_defaults(func=cmd_broker_add_user)

    sts = sub.add_parser("status", help="a running gateway's buses, devices, outbox, broker link, last event")
    sts.add_argument("--url", default=None, help="its local API (default http://127.0.0.1:9880)")
    sts.add_argument("--config", default=None, help="take the local API's address from this gateway config")
    sts.add_argument("--json", action="store_true", help="the raw JSON, for scripts")
    sts.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    sts.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="run everything on this machine with simulated hardware")
    demo.add_argument("--data", default="demo-data", help="folder for every file of the demo")
    demo.add_argument("--port", type=int, default=8080, help="the portal's port")
    demo.add_argument("--broker", default=None, help="host:port of an existing broker (default: start one)")
    demo.add_argument("--intruder-every", type=float, default=20.0, help="seconds between scripted zone trips")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds (for tests)")
    demo.set_defaults(func=cmd_demo)
    return p


def _stdout_to_devnull() -> None:
    """The reader of stdout has gone: send what is still buffered nowhere, so that Python's own flush at exit does not
    print "Exception ignored ... BrokenPipeError" after we have handled it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            ns = build_parser().parse_args(argv)
        except SystemExit:
            # --help or a usage error: argparse has written its text and exits with its own status, which stands
            # even if nobody reads the text (some Python 3.11 releases' argparse ignore the failed write, some not).
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                _stdout_to_devnull()
            raise
        rc = int(ns.func(ns) or 0)
        sys.stdout.flush()  # here, so a reader gone away is met inside the try, not at exit
    except BrokenPipeError:
        # Output piped to `head` (or a pager quit early): the reader has what it wanted. No traceback; the
        # exit status a shell gives a process killed by SIGPIPE.
        _stdout_to_devnull()
        return 128 + 13
    return rc


if __name__ == "__main__":
    sys.exit(main())
