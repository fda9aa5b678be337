"""The portal's configuration: one YAML file, validated once, strictly, at start-up.

Unknown keys are errors and every error names the file (and the line where it can be found).
Relative paths in the file are relative to the file's folder.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from common.configfile import ConfigError, convert_strict, line_of, parse_yaml, read_text
from gateway.wire import NAME_RE

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
LANGUAGES = ("zh-CN", "en")


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: Port = 8080  # 0 picks a free port (reported on the ready line)


class TlsConfig(_Strict):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip the broker's hostname check; only for a broker reached by IP on a private link


class MqttConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1883
    username: str | None = None
    password_file: str | None = None  # a file of mode 0600 holding the password alone
    tls: TlsConfig | None = None
    # A stable id: the broker keeps the portal's session (subscriptions, queued QoS 1 messages) across restarts.
    client_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "gatehouse-portal"
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    reconnect_min_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.5
    reconnect_max_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0


class GatewayRef(_Strict):
    site: Name
    gateway: Name
    name: str = ""  # a label for people ("1号楼机房")


class SessionConfig(_Strict):
    idle_timeout_s: Annotated[int, msgspec.Meta(ge=60, le=7 * 86400)] = 30 * 60
    absolute_timeout_s: Annotated[int, msgspec.Meta(ge=60, le=30 * 86400)] = 12 * 3600


#: argon2id cost floor: OWASP's equivalent settings (46 MiB x 1 pass ... 7 MiB x 5 passes) all reach 35 MiB-passes.
ARGON2_MIN_KIB_PASSES = 35 * 1024


class AuthConfig(_Strict):
    """Staff passwords and failed sign-ins (portal/auth.py describes the lock policy)."""

    # argon2id (RFC 9106) cost of new hashes; stored hashes of another cost are redone at their next sign-in.
    # 46 MiB, 2 passes, 1 lane: above OWASP's 19 MiB x 2 baseline, about 90 ms on the guardroom PC.
    argon2_memory_kib: Annotated[int, msgspec.Meta(ge=7 * 1024, le=1024 * 1024)] = 46 * 1024
    argon2_time_cost: Annotated[int, msgspec.Meta(ge=1, le=10)] = 2
    argon2_parallelism: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1
    failure_window_s: Annotated[int, msgspec.Meta(ge=60, le=86_400)] = 15 * 60  # also the first lock's length
    max_failures_user_address: Annotated[int, msgspec.Meta(ge=3, le=1000)] = 10
    max_failures_address: Annotated[int, msgspec.Meta(ge=3, le=10_000)] = 20  # any user names
    max_failures_user: Annotated[int, msgspec.Meta(ge=3, le=10_000)] = 30  # from addresses it never signed in from
    lock_max_s: Annotated[int, msgspec.Meta(ge=60, le=7 * 86_400)] = 86_400  # repeated locks double up to this


class StoreConfig(_Strict):
    path: str = "portal.db"  # relative to data_dir
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 256  # queued writes committed in one transaction
    queue_max: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000


#: Security logs (the audit trail with its sign-in records, the access log, events, incidents, door and arm
#: commands) are kept at least this long: six months.
SECURITY_LOG_MIN_DAYS = 183
Days = Annotated[int, msgspec.Meta(ge=0, le=36_500)]


class RetentionConfig(_Strict):
    """How long the portal keeps what it stores; portal/retention.py purges daily (docs/retention.md)."""

    audit_days: Days = 365  # security logs: each at least SECURITY_LOG_MIN_DAYS
    access_log_days: Days = 365  # also visitor passes and the guardroom's visitor records
    events_days: Days = 365
    incidents_days: Days = 365  # closed alarms with their step logs
    commands_days: Days = 365  # remote unlocks and arm/disarm orders
    former_residents_days: Days = 30  # after the last residency ended: name and phone anonymised
    visitors_days: Days = 30  # after a guardroom visitor's pass expired: name and note cleared
    work_items_days: Days = 90  # after a help call or problem report was finished: text, photo, notes cleared
    start_delay_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 300.0  # first run after start-up; then daily
    chunk_rows: Annotated[int, msgspec.Meta(ge=100, le=50_000)] = 2000  # rows per transaction


SECURITY_LOG_KEYS = ("audit_days", "access_log_days", "events_days", "incidents_days", "commands_days")


def _check_retention(cfg: PortalConfig, where: Any) -> list[str]:
    return [f"{where(f'$.retention.{k}')}: {k} is {getattr(cfg.retention, k)}, but security logs are kept at least"
            f" {SECURITY_LOG_MIN_DAYS} days (six months)"
            for k in SECURITY_LOG_KEYS if getattr(cfg.retention, k) < SECURITY_LOG_MIN_DAYS]


class PhoneConfig(_Strict):
    """Residents' phone pages and door plates (see portal/phone.py). Limits are per client address."""

    scans_per_min: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 60  # plate and phone page views
    bad_codes_per_10min: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20  # unknown plate codes, then 429
    signins_per_15min: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10
    photo_max_bytes: Annotated[int, msgspec.Meta(ge=16_384, le=16 * 1024 * 1024)] = 4 * 1024 * 1024
    unlock_wait_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 8.0  # for the gateway's command.result
    revocations_every_s: Annotated[int, msgspec.Meta(ge=5, le=86_400)] = 300  # re-send and re-sign timer
    sheet_font: str = ""  # a CJK TrueType/OpenType font for printed plates; empty: look in the usual places


class DoorsConfig(_Strict):
    """Doors at the console (see portal/doors.py)."""

    # How long a remote unlock waits for the gateway's command.result before it shows "no answer"; the
    # command expires then too, so a gateway that gets it later does not open the door behind the guard's back.
    unlock_wait_s: Annotated[float, msgspec.Meta(ge=0.2, le=120)] = 10.0


# ---------------------------------------------------------------- the alarm board (portal/alarms.py, board.py)

#: Alarm kinds: each has a checklist, and reports count by them.
ALARM_KINDS = ("fire", "gas", "panic", "medical", "intrusion", "fence_cut", "tamper", "fault")

#: What a guard does, per alarm kind, unless the config says otherwise (both languages, same steps).
DEFAULT_CHECKLISTS: dict[str, dict[str, list[str]]] = {
    "fire": {
        "zh-CN": ["调看监控，确认起火位置", "确认为真实火情后立即拨打 119", "派保安携带灭火器赶赴现场",
                  "组织楼内住户疏散，禁止乘坐电梯", "通知物业经理和消防控制室", "到小区门口接应消防车，清空消防通道"],
        "en": ["Check CCTV to confirm where the fire is", "Call 119 as soon as the fire is confirmed",
               "Send a guard with a fire extinguisher", "Evacuate the building; keep people out of the lifts",
               "Inform the property manager and the fire control room",
               "Meet the fire engines at the gate and keep the fire lane clear"],
    },
    "gas": {
        "zh-CN": ["电话通知住户关闭燃气阀门、开窗通风", "提醒住户不要开关电器、不要使用明火",
                  "派保安赶赴现场，疏散周边住户", "拨打燃气公司抢修电话", "情况严重时拨打 119"],
        "en": ["Call the flat: shut the gas valve and open the windows", "No light switches, no flames",
               "Send a guard and evacuate the neighbours", "Call the gas company's emergency line",
               "Call 119 if it is serious"],
    },
    "panic": {
        "zh-CN": ["回拨求助住户/求助点确认情况", "立即派保安赶赴现场", "有人身危险时拨打 110", "到场确认人员安全",
                  "记录求助原因和处置经过"],
        "en": ["Call back the flat or call point", "Send a guard at once", "Call 110 if anyone is in danger",
               "On site: make sure everyone is safe", "Note why help was called and what was done"],
    },
    "medical": {
        "zh-CN": ["回拨住户了解病情", "拨打 120 急救电话", "派保安携带急救箱赶赴现场", "到小区门口接应救护车并开启道闸",
                  "联系住户家属"],
        "en": ["Call the flat to ask about the patient", "Call 120", "Send a guard with the first-aid kit",
               "Meet the ambulance at the gate and open the barrier", "Contact the family"],
    },
    "intrusion": {
        "zh-CN": ["调看报警防区监控画面", "派两名保安赶赴现场核查", "发现可疑人员立即拨打 110",
                  "检查围墙、门窗有无破坏", "核查完毕后恢复布防"],
        "en": ["Check CCTV of the zone", "Send two guards to check", "Call 110 if anyone suspicious is seen",
               "Check walls, doors and windows for damage", "Re-arm once checked"],
    },
    "fence_cut": {
        "zh-CN": ["调看该段周界监控画面", "派保安检查电子围栏线路", "确认为人为破坏时拨打 110", "通知维保单位抢修",
                  "修复前加强该段巡逻"],
        "en": ["Check CCTV of the fence section", "Send a guard to inspect the fence wires",
               "Call 110 if it was cut on purpose", "Call the maintenance contractor",
               "Patrol the section until it is repaired"],
    },
    "tamper": {
        "zh-CN": ["调看设备附近监控画面", "派保安检查设备外壳和线路", "确认是否人为破坏", "通知维保单位"],
        "en": ["Check CCTV near the device", "Send a guard to check the casing and wiring",
               "Find out whether it was deliberate", "Inform the maintenance contractor"],
    },
    "fault": {
        "zh-CN": ["确认设备或网关是否离线", "检查供电和通信线路", "通知维保单位报修", "故障期间加强相关区域巡逻"],
        "en": ["Check whether the device or gateway is offline", "Check power and communication lines",
               "Report it to the maintenance contractor", "Patrol the area until it is fixed"],
    },
}

Coord = Annotated[float, msgspec.Meta(ge=0, le=100_000)]
MapCode = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class MapBuilding(_Strict, kw_only=True):
    code: MapCode  # as in events' place.building ("3")
    name: str = ""  # shown on the map; default "3幢" / "Bldg 3"
    x: Coord
    y: Coord
    w: Annotated[float, msgspec.Meta(gt=0, le=100_000)]
    h: Annotated[float, msgspec.Meta(gt=0, le=100_000)]


class MapZone(_Strict, kw_only=True):
    zone: MapCode  # as in events' place.zone / data.zone
    label: str = ""
    points: Annotated[list[tuple[Coord, Coord]], msgspec.Meta(min_length=2, max_length=500)]


class MapDoor(_Strict, kw_only=True):
    door: MapCode  # as in events' place.door
    label: str = ""
    x: Coord
    y: Coord


class SiteMapConfig(_Strict, kw_only=True):
    """An estate plan in its own units (metres, pixels...): the SVG's viewBox is 0 0 width height."""

    site: Name
    width: Annotated[float, msgspec.Meta(gt=0, le=100_000)] = 1000
    height: Annotated[float, msgspec.Meta(gt=0, le=100_000)] = 700
    buildings: list[MapBuilding] = []
    zones: list[MapZone] = []
    doors: list[MapDoor] = []


class ArmGroupRef(_Strict, kw_only=True):
    """A zone group the console can arm and disarm (groups also appear once a gateway reports them)."""

    site: Name
    gateway: Name
    group: Name
    label: str = ""


class AlarmsConfig(_Strict):
    # An alarm nobody has acknowledged after this long escalates: highlighted, rings faster and louder,
    # marked for the supervisor.
    escalate_after_s: Annotated[float, msgspec.Meta(ge=5, le=3600)] = 60.0
    check_every_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0  # the escalation timer's period
    command_life_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 60  # how late a gateway may carry out arm/disarm
    guards: list[Annotated[str, msgspec.Meta(min_length=1, max_length=40)]] = []  # offered when dispatching
    groups: list[ArmGroupRef] = []
    # kind → language → steps; replaces the default checklist of that kind (see DEFAULT_CHECKLISTS).
    checklists: dict[str, dict[str, list[Annotated[str, msgspec.Meta(min_length=1, max_length=200)]]]] = {}

    def checklist(self, kind: str, lang: str) -> list[str]:
        lists = self.checklists.get(kind) or DEFAULT_CHECKLISTS.get(kind) or {}
        return list(lists.get(lang) or lists.get("zh-CN") or [])


def _check_alarms(cfg: PortalConfig, where: Any) -> list[str]:
    problems: list[str] = []
    a = cfg.alarms
    for kind, langs in a.checklists.items():
        jp = f"$.alarms.checklists.{kind}"
        if kind not in ALARM_KINDS:
            problems.append(f"{where(jp)}: unknown alarm kind {kind!r} (one of {', '.join(ALARM_KINDS)})")
            continue
        if set(langs) != set(LANGUAGES):
            problems.append(f"{where(jp)}: give the steps in both {' and '.join(LANGUAGES)}")
        elif len({len(v) for v in langs.values()}) != 1 or not langs["zh-CN"]:
            problems.append(f"{where(jp)}: the languages must list the same number of steps (at least one)")
    for i, g in enumerate(a.groups):
        if not cfg.known(g.site, g.gateway):
            problems.append(f"{where(f'$.alarms.groups[{i}]')}: gateway {g.site}/{g.gateway} is not in gateways")
    sites: set[str] = set()
    for i, m in enumerate(cfg.site_maps):
        jp = f"$.site_maps[{i}]"
        if m.site in sites:
            problems.append(f"{where(jp)}: site {m.site} has two maps")
        sites.add(m.site)
        for what, items, attr in (("building", m.buildings, "code"), ("zone", m.zones, "zone"),
                                  ("door", m.doors, "door")):
            names = [getattr(x, attr) for x in items]
            for dup in sorted({n for n in names if names.count(n) > 1}):
                problems.append(f"{where(jp)}: {what} {dup!r} is drawn twice")
        for j, b in enumerate(m.buildings):
            if b.x + b.w > m.width or b.y + b.h > m.height:
                problems.append(f"{where(f'{jp}.buildings[{j}]')}: building {b.code!r} lies outside the map")
        for j, z in enumerate(m.zones):
            if any(x > m.width or y > m.height for x, y in z.points):
                problems.append(f"{where(f'{jp}.zones[{j}]')}: zone {z.zone!r} lies outside the map")
        for j, d in enumerate(m.doors):
            if d.x > m.width or d.y > m.height:
                problems.append(f"{where(f'{jp}.doors[{j}]')}: door {d.door!r} lies outside the map")
    return problems


class PortalConfig(_Strict):
    site_name: str = "Gatehouse"
    # The address residents' phones reach the portal at, printed in every plate's QR ("https://wy.example.cn").
    # Empty: the address the admin's browser used when the plate was rendered.
    public_url: str = ""
    phone: PhoneConfig = msgspec.field(default_factory=PhoneConfig)
    doors: DoorsConfig = msgspec.field(default_factory=DoorsConfig)
    alarms: AlarmsConfig = msgspec.field(default_factory=AlarmsConfig)  # the alarm board
    site_maps: list[SiteMapConfig] = []  # estate plans for the board's site map
    data_dir: str = "."
    listen: ListenConfig = msgspec.field(default_factory=ListenConfig)
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    gateways: list[GatewayRef] = []
    sessions: SessionConfig = msgspec.field(default_factory=SessionConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    cookie_secure: bool = False  # true when the portal is reached over TLS (a reverse proxy)
    # Extra origins accepted on state-changing requests and WebSockets besides the portal's own
    # (e.g. "https://portal.example.cn" behind a proxy that rewrites Host).
    allowed_origins: list[str] = []
    # Reverse proxies in front of the portal (CIDRs: "127.0.0.1", "10.0.0.0/8"). Only a request from one of
    # these has its X-Forwarded-For read: the client (for rate limits and the audit) is then the right-most
    # address in it that is not one of them. Empty: the direct peer is the client, X-Forwarded-For is ignored.
    trusted_proxies: list[str] = []
    language: Literal["zh-CN", "en"] = "zh-CN"
    timezone: str = "Asia/Shanghai"  # the site's local time, for display only; events are UTC
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    ws_queue_max: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 256  # per console; overflow drops the client
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    source: str = ""  # the file it came from, set by load()

    def data_path(self, name: str) -> Path:
        return Path(self.data_dir) / name

    @property
    def db_path(self) -> Path:
        return self.data_path(self.store.path)

    def known(self, site: str, gateway: str) -> bool:
        return any(g.site == site and g.gateway == gateway for g in self.gateways)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


# ---------------------------------------------------------------- loading


def parse(path: Path, text: str) -> PortalConfig:
    """Validate the text of a config file (no path resolution). Raises :class:`ConfigError`."""
    data, tree = parse_yaml(path, text)
    cfg = convert_strict(path, PortalConfig, data, tree)
    problems = _cross_check(path, cfg, tree)
    if problems:
        raise ConfigError(problems)
    return cfg


def _cross_check(path: Path, cfg: PortalConfig, tree: Any) -> list[str]:
    problems: list[str] = []

    def where(jp: str) -> str:
        line = line_of(tree, jp)
        return f"{path}:{line}" if line else str(path)

    seen: set[tuple[str, str]] = set()
    for i, g in enumerate(cfg.gateways):
        key = (g.site, g.gateway)
        if key in seen:
            problems.append(f"{where(f'$.gateways[{i}]')}: gateway {g.site}/{g.gateway} is listed twice")
        seen.add(key)
    try:
        ZoneInfo(cfg.timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long, or a folder ("Asia")
        problems.append(f"{where('$.timezone')}: unknown time zone {cfg.timezone!r} (e.g. Asia/Shanghai)")
    if cfg.mqtt.password_file and not cfg.mqtt.username:
        problems.append(f"{where('$.mqtt')}: password_file given without username")
    if cfg.mqtt.reconnect_max_s < cfg.mqtt.reconnect_min_s:
        problems.append(f"{where('$.mqtt.reconnect_max_s')}: reconnect_max_s is below reconnect_min_s")
    if cfg.sessions.absolute_timeout_s < cfg.sessions.idle_timeout_s:
        problems.append(f"{where('$.sessions.absolute_timeout_s')}: absolute timeout is below the idle timeout")
    a = cfg.auth
    if a.argon2_memory_kib * a.argon2_time_cost < ARGON2_MIN_KIB_PASSES:
        problems.append(f"{where('$.auth')}: argon2 cost too low: argon2_memory_kib x argon2_time_cost must reach"
                        f" {ARGON2_MIN_KIB_PASSES} (e.g. 19456 x 2)")
    if a.lock_max_s < a.failure_window_s:
        problems.append(f"{where('$.auth.lock_max_s')}: lock_max_s is below failure_window_s")
    if cfg.public_url and not re.fullmatch(r"https?://[^/\s]+(/[^\s?#]*)?", cfg.public_url):
        problems.append(f"{where('$.public_url')}: {cfg.public_url!r} is not a URL like https://host[:port][/path]")
    for i, o in enumerate(cfg.allowed_origins):
        if not re.fullmatch(r"https?://[^/\s]+", o):
            problems.append(f"{where(f'$.allowed_origins[{i}]')}: {o!r} is not an origin like https://host[:port]")
    for i, c in enumerate(cfg.trusted_proxies):
        try:
            ipaddress.ip_network(c, strict=True)
        except ValueError as e:
            problems.append(f"{where(f'$.trusted_proxies[{i}]')}: {c!r} is not a network like 10.0.0.0/8 ({e})")
    problems += _check_alarms(cfg, where)
    problems += _check_retention(cfg, where)
    return problems


def load(path: str | os.PathLike[str]) -> PortalConfig:
    """Read, validate and resolve a portal config. Raises :class:`ConfigError`."""
    p = Path(path)
    cfg = parse(p, read_text(p))
    base = p.resolve().parent

    def rel(v: str | None) -> str | None:
        return str((base / v).resolve()) if v else None

    m = cfg.mqtt
    tls = m.tls
    if tls is not None:
        tls = msgspec.structs.replace(
            tls, ca_file=rel(tls.ca_file), cert_file=rel(tls.cert_file), key_file=rel(tls.key_file)
        )
    return msgspec.structs.replace(
        cfg,
        source=str(p),
        data_dir=str((base / cfg.data_dir).resolve()),
        mqtt=msgspec.structs.replace(m, password_file=rel(m.password_file), tls=tls),
    )
