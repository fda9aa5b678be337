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
from portal.store.engine import Postgres, check_dsn
from portal.store.storekey import StoreKey, open_for

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
    # Several instances (a monitoring centre, docs/centre.md): the MQTT shared-subscription group they all name, so
    # the broker hands each gateway batch to one of them ($share/<group>/...). Each instance then has a client_id of
    # its own and a clean session: a dead instance's share goes to the living, and what it held is re-sent by the
    # gateways, which keep every event until some instance acknowledges it. Empty: one instance.
    share_group: Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})?$")] = ""
    reconnect_min_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.5
    reconnect_max_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    # False for an estate's own guardroom portal whose broker is bridged to a monitoring centre (docs/centre.md): it
    # stores and shows every event it gets but acknowledges none, so a gateway deletes an event from its outbox only
    # when the centre has stored it and the centre's acknowledgement has crossed the bridge.
    acknowledge: bool = True


class GatewayRef(_Strict):
    site: Name
    gateway: Name
    name: str = ""  # a label for people ("1号楼机房")


class SessionConfig(_Strict):
    idle_timeout_s: Annotated[int, msgspec.Meta(ge=60, le=7 * 86400)] = 30 * 60
    absolute_timeout_s: Annotated[int, msgspec.Meta(ge=60, le=30 * 86400)] = 12 * 3600
    # A guard's session on a guard station (a guardroom PC bound with a station cookie, portal/web/stations.py) lasts
    # a whole shift, quiet or not: no idle timeout shorter than this, and it ends at the next guard's sign-on.
    station_timeout_s: Annotated[int, msgspec.Meta(ge=3600, le=2 * 86400)] = 14 * 3600


class ConsoleConfig(_Strict):
    """The console's proof of life: the server beats on every console socket; a page that hears nothing for
    ``stale_after_s`` turns red and rings ("报警看板已断开"). Sessions behind open sockets are re-checked at
    every beat, so a socket ends with its session."""

    heartbeat_s: Annotated[float, msgspec.Meta(ge=0.2, le=5)] = 2.0
    stale_after_s: Annotated[float, msgspec.Meta(ge=1, le=9)] = 6.0


class ChannelConfig(_Strict, kw_only=True):
    """One way of reaching people outside the guardroom (portal/alarms/notify.py; docs/install.md)."""

    name: Name
    kind: Literal["wecom", "dingtalk", "sms", "email"]
    label: str = ""  # what people call it ("值班主管企业微信群"); default the name
    min_priority: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0  # only incidents at least this urgent
    # wecom / dingtalk: the robot's webhook URL (it holds the robot's key); sms: the gateway's URL. A 0600 file.
    url_file: str | None = None
    secret_file: str | None = None  # dingtalk: the robot's signing secret (加签), a 0600 file
    token_file: str | None = None  # sms: the gateway's bearer token, a 0600 file
    mentions: list[Annotated[str, msgspec.Meta(pattern=r"^\+?[0-9]{5,20}$")]] = []  # wecom / dingtalk: phones to @
    to: list[Annotated[str, msgspec.Meta(min_length=3, max_length=254)]] = []  # sms: phones; email: addresses
    smtp_host: str = ""
    smtp_port: Port = 25
    smtp_security: Literal["none", "starttls", "ssl"] = "starttls"
    smtp_user: str = ""
    smtp_password_file: str | None = None
    sender: str = ""  # email: the From address

    @property
    def shown(self) -> str:
        return self.label or self.name


class NotifyConfig(_Strict):
    """Escalations reach people through these channels, each delivery retried with backoff and recorded."""

    channels: list[ChannelConfig] = []
    attempts: Annotated[int, msgspec.Meta(ge=1, le=50)] = 8
    retry_first_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 5.0
    retry_max_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 300.0
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0  # one attempt


#: argon2id cost floor: OWASP's equivalent settings (46 MiB x 1 pass ... 7 MiB x 5 passes) all reach 35 MiB-passes.
ARGON2_MIN_KIB_PASSES = 35 * 1024


class AuthConfig(_Strict):
    """Staff passwords and failed sign-ins (portal/web/auth.py describes the lock policy)."""

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
    """Where the portal keeps its data (docs/store.md): a SQLite file (one estate: the default), or a PostgreSQL
    database that several portal instances share (a monitoring centre)."""

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    path: str = "portal.db"  # sqlite: relative to data_dir
    # postgresql: a libpq connection string without the password ("host=db1 port=5432 dbname=gatehouse
    # user=gatehouse sslmode=verify-full"); the password is in passfile (libpq's pgpass format, mode 0600, relative
    # to the config file), or in the PGPASSFILE / ~/.pgpass libpq reads by itself when passfile is empty.
    dsn: str = ""
    passfile: str = ""
    # The store key (portal/store/storekey.py: sealed plate codes, the keyed audit chain), relative to data_dir; made
    # (mode 0600) with a new store. Keep a copy apart from the database's backups.
    key_file: str = "store.key"
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 256  # queued writes committed in one transaction
    queue_max: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000


#: Security logs (the audit trail with its sign-in records, the access log, events, incidents, door and arm
#: commands) are kept at least this long: six months.
SECURITY_LOG_MIN_DAYS = 183
Days = Annotated[int, msgspec.Meta(ge=0, le=36_500)]


class RetentionConfig(_Strict):
    """How long the portal keeps what it stores; portal/estate/retention.py purges daily (docs/retention.md)."""

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
    return [
        f"{where(f'$.retention.{k}')}: {k} is {getattr(cfg.retention, k)}, but security logs are kept at least"
        f" {SECURITY_LOG_MIN_DAYS} days (six months)"
        for k in SECURITY_LOG_KEYS
        if getattr(cfg.retention, k) < SECURITY_LOG_MIN_DAYS
    ]


class PhoneConfig(_Strict):
    """Residents' phone pages and door plates (see portal/estate/phone.py). Limits are per client address (IPv6: per
    /64);
    residents' failed sign-ins are locked by the ``auth`` section's rules, as staff's are (portal/estate/service.py)."""

    scans_per_min: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 60  # plate and phone page views
    bad_codes_per_10min: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20  # unknown plate codes, then 429
    photo_max_bytes: Annotated[int, msgspec.Meta(ge=16_384, le=16 * 1024 * 1024)] = 4 * 1024 * 1024
    # A report photo's width x height, checked before it is decoded (a 50-megapixel phone camera fits)
    photo_max_pixels: Annotated[int, msgspec.Meta(ge=1_000_000, le=200_000_000)] = 50_000_000
    unlock_wait_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 8.0  # for the gateway's command.result
    revocations_every_s: Annotated[int, msgspec.Meta(ge=5, le=86_400)] = 300  # re-send and re-sign timer
    sheet_font: str = ""  # a CJK TrueType/OpenType font for printed plates; empty: look in the usual places


PhoneNumber = Annotated[str, msgspec.Meta(pattern=r"^\+?[0-9][0-9 ()-]{1,30}$")]
MaybePhone = Annotated[str, msgspec.Meta(pattern=r"^(\+?[0-9][0-9 ()-]{1,30})?$")]
EMERGENCY_KINDS = ("police", "fire", "ambulance", "other")


class EmergencyNumber(_Strict, kw_only=True):
    """A number the plate pages list under "emergency": the kind names it in each language (``label`` for other)."""

    kind: Literal["police", "fire", "ambulance", "other"]
    number: PhoneNumber
    label: Annotated[str, msgspec.Meta(max_length=40)] = ""  # required for kind other; else replaces the kind's name


def _china_emergency() -> list[EmergencyNumber]:
    return [
        EmergencyNumber(kind="police", number="110"),
        EmergencyNumber(kind="fire", number="119"),
        EmergencyNumber(kind="ambulance", number="120"),
    ]


class SiteInfo(_Strict, kw_only=True):
    """What a site's door plates tell residents and visitors: the property office and the emergency numbers."""

    site: Name
    office_phone: MaybePhone = ""
    office_hours: Annotated[str, msgspec.Meta(max_length=80)] = ""  # as people write it: "8:00-20:00"
    guardroom_phone: MaybePhone = ""  # the guardroom, day and night
    emergency: list[EmergencyNumber] = msgspec.field(default_factory=_china_emergency)


class DoorsConfig(_Strict):
    """Doors at the console (see portal/doors/doors.py)."""

    # How long a remote unlock waits for the gateway's command.result before it shows "no answer"; the
    # command expires then too, so a gateway that gets it later does not open the door behind the guard's back.
    unlock_wait_s: Annotated[float, msgspec.Meta(ge=0.2, le=120)] = 10.0


# ---------------------------------------------------------------- the alarm board (portal/alarms/: incidents, board)

#: Alarm kinds: each has a checklist, and reports count by them.
ALARM_KINDS = ("fire", "gas", "panic", "medical", "intrusion", "fence_cut", "tamper", "fault", "care", "patrol")

#: What a guard does, per alarm kind, unless the config says otherwise (both languages, same steps).
DEFAULT_CHECKLISTS: dict[str, dict[str, list[str]]] = {
    "fire": {
        "zh-CN": [
            "调看监控，确认起火位置",
            "确认为真实火情后立即拨打 119",
            "派保安携带灭火器赶赴现场",
            "组织楼内住户疏散，禁止乘坐电梯",
            "通知物业经理和消防控制室",
            "到小区门口接应消防车，清空消防通道",
        ],
        "en": [
            "Check CCTV to confirm where the fire is",
            "Call 119 as soon as the fire is confirmed",
            "Send a guard with a fire extinguisher",
            "Evacuate the building; keep people out of the lifts",
            "Inform the property manager and the fire control room",
            "Meet the fire engines at the gate and keep the fire lane clear",
        ],
    },
    "gas": {
        "zh-CN": [
            "电话通知住户关闭燃气阀门、开窗通风",
            "提醒住户不要开关电器、不要使用明火",
            "派保安赶赴现场，疏散周边住户",
            "拨打燃气公司抢修电话",
            "情况严重时拨打 119",
        ],
        "en": [
            "Call the flat: shut the gas valve and open the windows",
            "No light switches, no flames",
            "Send a guard and evacuate the neighbours",
            "Call the gas company's emergency line",
            "Call 119 if it is serious",
        ],
    },
    "panic": {
        "zh-CN": [
            "回拨求助住户/求助点确认情况",
            "立即派保安赶赴现场",
            "有人身危险时拨打 110",
            "到场确认人员安全",
            "记录求助原因和处置经过",
        ],
        "en": [
            "Call back the flat or call point",
            "Send a guard at once",
            "Call 110 if anyone is in danger",
            "On site: make sure everyone is safe",
            "Note why help was called and what was done",
        ],
    },
    "medical": {
        "zh-CN": [
            "回拨住户了解病情",
            "拨打 120 急救电话",
            "派保安携带急救箱赶赴现场",
            "到小区门口接应救护车并开启道闸",
            "联系住户家属",
        ],
        "en": [
            "Call the flat to ask about the patient",
            "Call 120",
            "Send a guard with the first-aid kit",
            "Meet the ambulance at the gate and open the barrier",
            "Contact the family",
        ],
    },
    "intrusion": {
        "zh-CN": [
            "调看报警防区监控画面",
            "派两名保安赶赴现场核查",
            "发现可疑人员立即拨打 110",
            "检查围墙、门窗有无破坏",
            "核查完毕后恢复布防",
        ],
        "en": [
            "Check CCTV of the zone",
            "Send two guards to check",
            "Call 110 if anyone suspicious is seen",
            "Check walls, doors and windows for damage",
            "Re-arm once checked",
        ],
    },
    "fence_cut": {
        "zh-CN": [
            "调看该段周界监控画面",
            "派保安检查电子围栏线路",
            "确认为人为破坏时拨打 110",
            "通知维保单位抢修",
            "修复前加强该段巡逻",
        ],
        "en": [
            "Check CCTV of the fence section",
            "Send a guard to inspect the fence wires",
            "Call 110 if it was cut on purpose",
            "Call the maintenance contractor",
            "Patrol the section until it is repaired",
        ],
    },
    "tamper": {
        "zh-CN": ["调看设备附近监控画面", "派保安检查设备外壳和线路", "确认是否人为破坏", "通知维保单位"],
        "en": [
            "Check CCTV near the device",
            "Send a guard to check the casing and wiring",
            "Find out whether it was deliberate",
            "Inform the maintenance contractor",
        ],
    },
    "fault": {
        "zh-CN": ["确认设备或网关是否离线", "检查供电和通信线路", "通知维保单位报修", "故障期间加强相关区域巡逻"],
        "en": [
            "Check whether the device or gateway is offline",
            "Check power and communication lines",
            "Report it to the maintenance contractor",
            "Patrol the area until it is fixed",
        ],
    },
    "care": {  # a household watched for a resident living alone (portal/care)
        "zh-CN": [
            "拨打住户电话确认是否平安",
            "联系紧急联系人（家属或网格员）",
            "无法联系时派保安上门查看",
            "有人身危险时拨打 120 或 110",
            "记录联系和上门情况",
        ],
        "en": [
            "Call the flat to check the resident is well",
            "Call the named contact (family or grid worker)",
            "If nobody answers, send a guard to the door",
            "Call 120 or 110 if anyone is in danger",
            "Note who was reached and what was found",
        ],
    },
    "patrol": {  # a patrol checkpoint not scanned in time (portal/patrol)
        "zh-CN": ["联系当班巡逻保安确认情况", "保安无应答时派人沿路线查找", "安排补巡漏巡点位", "记录原因"],
        "en": [
            "Call the guard on patrol",
            "If the guard does not answer, send someone along the route",
            "Have the missed checkpoints visited",
            "Note the reason",
        ],
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
    # Priority alarms (at least priority_min: 40 is panic, SOS and medical; 50 fire) escalate sooner.
    priority_min: Annotated[int, msgspec.Meta(ge=0, le=100)] = 40
    priority_escalate_after_s: Annotated[float, msgspec.Meta(ge=5, le=3600)] = 15.0
    # Kinds whose checklist must be ticked to the end before an incident is resolved.
    checklist_required: list[str] = msgspec.field(default_factory=lambda: ["fire", "gas", "panic", "medical"])
    check_every_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0  # the escalation timer's period
    command_life_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 60  # how late a gateway may carry out arm/disarm
    guards: list[Annotated[str, msgspec.Meta(min_length=1, max_length=40)]] = []  # offered when dispatching
    groups: list[ArmGroupRef] = []
    # kind → language → steps; replaces the default checklist of that kind (see DEFAULT_CHECKLISTS).
    checklists: dict[str, dict[str, list[Annotated[str, msgspec.Meta(min_length=1, max_length=200)]]]] = {}

    def checklist(self, kind: str, lang: str) -> list[str]:
        lists = self.checklists.get(kind) or DEFAULT_CHECKLISTS.get(kind) or {}
        return list(lists.get(lang) or lists.get("zh-CN") or [])

    def escalate_after(self, priority: int) -> float:
        return (
            min(self.priority_escalate_after_s, self.escalate_after_s)
            if priority >= self.priority_min
            else self.escalate_after_s
        )


def _check_alarms(cfg: PortalConfig, where: Any) -> list[str]:
    problems: list[str] = []
    a = cfg.alarms
    for i, kind in enumerate(a.checklist_required):
        if kind not in ALARM_KINDS:
            problems.append(
                f"{where(f'$.alarms.checklist_required[{i}]')}: unknown alarm kind {kind!r}"
                f" (one of {', '.join(ALARM_KINDS)})"
            )
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
        for what, items, attr in (
            ("building", m.buildings, "code"),
            ("zone", m.zones, "zone"),
            ("door", m.doors, "door"),
        ):
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


# ---------------------------------------------------------------- the grid platform (portal/grid/, docs/grid.md)

GRID_CAUSES = ("real", "false", "test", "device_fault", "unknown")
GRID_FLAGS = ("damage", "police")
GridCode = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z_.-]{1,32}$")]
GridName = Annotated[str, msgspec.Meta(min_length=1, max_length=40)]


class GridSiteConfig(_Strict, kw_only=True):
    """Where one estate sits in the grid: its grid code (网格编码) and, where configured, its coordinates."""

    site: Name
    grid_code: GridCode
    address: Annotated[str, msgspec.Meta(max_length=120)] = ""  # the address before 3幢2单元; default site_name
    lat: Annotated[float, msgspec.Meta(ge=-90, le=90)] | None = None
    lon: Annotated[float, msgspec.Meta(ge=-180, le=180)] | None = None
    crs: Literal["CGCS2000", "WGS84", "GCJ02"] = "CGCS2000"


class GridCategory(_Strict, kw_only=True):
    """The platform's category and sub-category (GB/T 30428.2-style codes) of one kind of event."""

    category: GridCode
    category_name: GridName
    subcategory: GridCode
    subcategory_name: GridName
    urgency: Literal["urgent", "high", "normal"] = "normal"


class GridRule(_Strict, kw_only=True):
    """Which incidents go up, and when.

    ``on: open`` when the incident opens; ``close`` when it is closed (``causes``: with one of these causes;
    ``flags``: with at least one of these marks, damage or police); ``lasting`` when it has stayed open and not
    restored for ``after_s``; ``forward`` when a guard forwards it (problem reports). ``kinds`` (incident kinds,
    ``problem`` for reports) and ``types`` (event types) narrow it; empty: any."""

    on: Literal["open", "close", "lasting", "forward"]
    kinds: list[Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]] = []
    types: list[Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]] = []
    causes: list[Literal["real", "false", "test", "device_fault", "unknown"]] = []
    flags: list[Literal["damage", "police"]] = []
    min_priority: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    after_s: Annotated[int, msgspec.Meta(ge=60, le=30 * 86400)] | None = None


#: The default upward report: residents' SOS, problem reports a guard forwards, alarms closed as real with damage
#: or police involvement, care alerts, device faults lasting four hours.
DEFAULT_GRID_RULES: list[GridRule] = [
    GridRule(on="open", types=["house.sos"]),
    GridRule(on="forward", kinds=["problem"]),
    GridRule(on="close", causes=["real"], flags=["damage", "police"]),
    GridRule(on="open", kinds=["care"]),
    GridRule(on="lasting", kinds=["fault"], after_s=4 * 3600),
]


def _cat(c: str, cn: str, s: str, sn: str, u: Literal["urgent", "high", "normal"] = "normal") -> GridCategory:
    return GridCategory(category=c, category_name=cn, subcategory=s, subcategory_name=sn, urgency=u)


#: Default categories by what the event is: an incident kind, ``sos`` (a resident's help call), ``problem.<category>``
#: (a resident's problem report), ``care``, and ``other`` for anything else. The big classes are GB/T 30428.2's
#: (01 市容环境, 04 突发事件, 05 街面秩序, 06 扩展事件); the sub-category codes are ours: set the platform's own.
DEFAULT_GRID_CATEGORIES: dict[str, GridCategory] = {
    "fire": _cat("04", "突发事件", "0401", "火灾", "urgent"),
    "gas": _cat("04", "突发事件", "0402", "燃气泄漏", "urgent"),
    "medical": _cat("04", "突发事件", "0403", "急病救助", "urgent"),
    "panic": _cat("06", "扩展事件", "0601", "紧急求助", "urgent"),
    "sos": _cat("06", "扩展事件", "0602", "居民紧急求助", "urgent"),
    "care": _cat("06", "扩展事件", "0603", "独居老人关爱", "high"),
    "intrusion": _cat("06", "扩展事件", "0604", "入侵报警", "high"),
    "fence_cut": _cat("06", "扩展事件", "0605", "周界破坏", "high"),
    "tamper": _cat("06", "扩展事件", "0606", "设备破坏", "normal"),
    "fault": _cat("06", "扩展事件", "0607", "安防设施故障", "normal"),
    "problem.repair": _cat("06", "扩展事件", "0610", "公共设施报修"),
    "problem.noise": _cat("06", "扩展事件", "0611", "噪声扰民"),
    "problem.hygiene": _cat("01", "市容环境", "0112", "环境卫生"),
    "problem.safety": _cat("06", "扩展事件", "0612", "安全隐患", "high"),
    "problem.parking": _cat("05", "街面秩序", "0513", "车辆乱停放"),
    "problem.other": _cat("06", "扩展事件", "0619", "其他问题"),
    "other": _cat("06", "扩展事件", "0699", "其他事件"),
}


class GridConfig(_Strict):
    """The link up to the district's grid-governance platform (off while ``url`` is empty)."""

    url: str = ""  # the platform's base URL: records go to <url>/events, polls read <url>/events/<number>
    key_file: str | None = None  # the HMAC-SHA256 key shared with the platform, a 0600 file
    key_id: GridCode = "gatehouse"  # who signs: the estate's account at the platform
    number_prefix: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z]{1,12}$")] = "GH"
    ca_file: str | None = None  # the CA that signed the platform's certificate (default: the system's)
    client_cert_file: str | None = None  # mutual TLS: the portal's certificate and its key (0600)
    client_key_file: str | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    retry_first_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 5.0
    retry_max_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 600.0
    tick_s: Annotated[float, msgspec.Meta(ge=0.05, le=60)] = 1.0  # the delivery and fault timers' period
    poll_every_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 0.0  # 0: status comes by callback only
    callback_window_s: Annotated[int, msgspec.Meta(ge=30, le=3600)] = 300  # a callback's timestamp, either way
    max_attachment_bytes: Annotated[int, msgspec.Meta(ge=16_384, le=16 * 1024 * 1024)] = 4 * 1024 * 1024
    sites: list[GridSiteConfig] = []  # only these sites' events go up
    rules: list[GridRule] = msgspec.field(default_factory=lambda: list(DEFAULT_GRID_RULES))
    categories: dict[Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_.]{0,63}$")], GridCategory] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def category(self, key: str) -> GridCategory:
        return (
            self.categories.get(key)
            or DEFAULT_GRID_CATEGORIES.get(key)
            or self.categories.get("other")
            or DEFAULT_GRID_CATEGORIES["other"]
        )

    def site(self, site: str) -> GridSiteConfig | None:
        return next((s for s in self.sites if s.site == site), None)


_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def _check_grid(cfg: PortalConfig, where: Any) -> list[str]:
    g = cfg.grid
    problems: list[str] = []
    if not g.enabled:
        if g.sites:
            problems.append(f"{where('$.grid')}: grid.sites given without grid.url")
        return problems
    m = re.fullmatch(r"(https?)://([^/\s:?#]+|\[[0-9a-fA-F:]+\])(:[0-9]{1,5})?(/[^\s?#]*)?", g.url)
    if not m:
        problems.append(f"{where('$.grid.url')}: {g.url!r} is not a URL like https://host[:port][/path]")
    elif m.group(1) == "http" and m.group(2) not in _LOOPBACK:
        problems.append(
            f"{where('$.grid.url')}: the grid platform is reached over https (plain http only on"
            " loopback, for tests and the demo)"
        )
    if not g.key_file:
        problems.append(f"{where('$.grid')}: the grid link needs key_file (the HMAC key shared with the platform)")
    if bool(g.client_cert_file) != bool(g.client_key_file):
        problems.append(f"{where('$.grid')}: mutual TLS needs both client_cert_file and client_key_file")
    if g.retry_max_s < g.retry_first_s:
        problems.append(f"{where('$.grid.retry_max_s')}: retry_max_s is below retry_first_s")
    if not g.sites:
        problems.append(f"{where('$.grid')}: list the sites that report up (grid.sites, each with its grid_code)")
    seen: set[str] = set()
    for i, s in enumerate(g.sites):
        if s.site in seen:
            problems.append(f"{where(f'$.grid.sites[{i}]')}: site {s.site} is listed twice")
        seen.add(s.site)
        if (s.lat is None) != (s.lon is None):
            problems.append(f"{where(f'$.grid.sites[{i}]')}: give both lat and lon, or neither")
    known = set(DEFAULT_GRID_CATEGORIES) | set(g.categories)
    for i, r in enumerate(g.rules):
        jp = f"$.grid.rules[{i}]"
        if r.on == "lasting" and r.after_s is None:
            problems.append(f"{where(jp)}: a lasting rule needs after_s")
        if r.on != "lasting" and r.after_s is not None:
            problems.append(f"{where(jp)}: after_s is for lasting rules only")
        if r.on != "close" and (r.causes or r.flags):
            problems.append(f"{where(jp)}: causes and flags are for close rules only")
        if r.on == "forward" and r.kinds and set(r.kinds) - {"problem"}:
            problems.append(f"{where(jp)}: guards forward problem reports (kinds: [problem])")
        for k in r.kinds:
            if k not in known and not any(c.startswith(k + ".") for c in known):
                problems.append(f"{where(jp)}: kind {k!r} has no grid category: add grid.categories.{k}")
    return problems


class PortalConfig(_Strict):
    site_name: str = "Gatehouse"
    # The address residents' phones reach the portal at, printed in every plate's QR ("https://wy.example.cn").
    # Empty: the address the admin's browser used when the plate was rendered.
    public_url: str = ""
    phone: PhoneConfig = msgspec.field(default_factory=PhoneConfig)
    doors: DoorsConfig = msgspec.field(default_factory=DoorsConfig)
    alarms: AlarmsConfig = msgspec.field(default_factory=AlarmsConfig)  # the alarm board
    console: ConsoleConfig = msgspec.field(default_factory=ConsoleConfig)
    notify: NotifyConfig = msgspec.field(default_factory=NotifyConfig)  # escalations to people outside
    grid: GridConfig = msgspec.field(default_factory=GridConfig)  # events up to the grid platform, status back
    site_maps: list[SiteMapConfig] = []  # estate plans for the board's site map (a plan drawn on the web wins)
    # Per site: the property office's phone and hours and the emergency numbers, shown on every door plate's page.
    sites: list[SiteInfo] = []
    data_dir: str = "."
    listen: ListenConfig = msgspec.field(default_factory=ListenConfig)
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    gateways: list[GatewayRef] = []
    sessions: SessionConfig = msgspec.field(default_factory=SessionConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    # The bearer token (a file of mode 0600) for GET /metrics and /api/health's details without a staff session,
    # e.g. Prometheus' credentials_file. Empty: data_dir/scrape.token, made at the first start.
    scrape_token_file: str = ""
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

    @property
    def store_target(self) -> Path | Postgres:
        """Where the store is: the SQLite file, or the PostgreSQL database."""
        s = self.store
        if s.backend == "postgresql":
            return Postgres(s.dsn, Path(s.passfile) if s.passfile else None)
        return self.db_path

    @property
    def key_path(self) -> Path:
        return self.data_path(self.store.key_file)

    def store_key(self) -> StoreKey:
        """The store key of this portal (:func:`portal.store.storekey.open_for` its key file and store)."""
        return open_for(self.key_path, self.store_target)

    def known(self, site: str, gateway: str) -> bool:
        return any(g.site == site and g.gateway == gateway for g in self.gateways)

    def site_info(self, site: str) -> SiteInfo:
        """The ``sites:`` entry of ``site``; a site not listed has no office phone and the national emergency
        numbers."""
        return next((s for s in self.sites if s.site == site), None) or SiteInfo(site=site)

    def warnings(self) -> list[str]:
        """What works but will surprise people (``python -m portal check`` prints these)."""
        out = []
        if not self.public_url:
            out.append(
                "public_url is not set: plates cannot be printed (the web refuses, the CLI too) until it"
                " holds the address residents' phones reach the portal at, e.g. https://wy.example.cn"
            )
        if not any(s.office_phone for s in self.sites):
            out.append(
                "no site lists an office_phone under sites: the plate pages show residents no number of the"
                " property office"
            )
        return out

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
    st = cfg.store
    if st.backend == "postgresql":
        why = check_dsn(st.dsn) if st.dsn else "is needed with backend: postgresql"
        if why:
            problems.append(f"{where('$.store.dsn')}: store.dsn {why}")
    elif st.dsn or st.passfile:
        problems.append(f"{where('$.store')}: dsn and passfile are for backend: postgresql (this store is SQLite)")
    if cfg.mqtt.password_file and not cfg.mqtt.username:
        problems.append(f"{where('$.mqtt')}: password_file given without username")
    if cfg.mqtt.reconnect_max_s < cfg.mqtt.reconnect_min_s:
        problems.append(f"{where('$.mqtt.reconnect_max_s')}: reconnect_max_s is below reconnect_min_s")
    if cfg.sessions.absolute_timeout_s < cfg.sessions.idle_timeout_s:
        problems.append(f"{where('$.sessions.absolute_timeout_s')}: absolute timeout is below the idle timeout")
    a = cfg.auth
    if a.argon2_memory_kib * a.argon2_time_cost < ARGON2_MIN_KIB_PASSES:
        problems.append(
            f"{where('$.auth')}: argon2 cost too low: argon2_memory_kib x argon2_time_cost must reach"
            f" {ARGON2_MIN_KIB_PASSES} (e.g. 19456 x 2)"
        )
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
    problems += _check_sites(cfg, where)
    problems += _check_retention(cfg, where)
    problems += _check_notify(cfg, where)
    problems += _check_grid(cfg, where)
    if cfg.console.stale_after_s < 2 * cfg.console.heartbeat_s:
        problems.append(f"{where('$.console.stale_after_s')}: stale_after_s must be at least two heartbeats")
    return problems


def _check_sites(cfg: PortalConfig, where: Any) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for i, s in enumerate(cfg.sites):
        if s.site in seen:
            problems.append(f"{where(f'$.sites[{i}]')}: site {s.site} is listed twice")
        seen.add(s.site)
        for j, e in enumerate(s.emergency):
            if e.kind == "other" and not e.label.strip():
                problems.append(
                    f"{where(f'$.sites[{i}].emergency[{j}]')}: an emergency number of kind other needs a label"
                )
    return problems


_CHANNEL_NEEDS = {
    "wecom": ("url_file",),
    "dingtalk": ("url_file",),
    "sms": ("url_file", "to"),
    "email": ("smtp_host", "sender", "to"),
}


def _check_notify(cfg: PortalConfig, where: Any) -> list[str]:
    problems: list[str] = []
    n = cfg.notify
    if n.retry_max_s < n.retry_first_s:
        problems.append(f"{where('$.notify.retry_max_s')}: retry_max_s is below retry_first_s")
    names: set[str] = set()
    for i, ch in enumerate(n.channels):
        jp = f"$.notify.channels[{i}]"
        if ch.name in names:
            problems.append(f"{where(jp)}: channel {ch.name} is listed twice")
        names.add(ch.name)
        for f in _CHANNEL_NEEDS[ch.kind]:
            if not getattr(ch, f):
                problems.append(f"{where(jp)}: a {ch.kind} channel needs {f}")
        if ch.secret_file and ch.kind != "dingtalk":
            problems.append(f"{where(jp)}: secret_file is for dingtalk channels only")
        if ch.smtp_password_file and not ch.smtp_user:
            problems.append(f"{where(jp)}: smtp_password_file given without smtp_user")
        if ch.kind == "email":
            bad = [a for a in [*ch.to, ch.sender] if not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", a)]
            if bad:
                problems.append(f"{where(jp)}: not an e-mail address: {', '.join(bad)}")
        if ch.kind == "sms":
            bad = [a for a in ch.to if not re.fullmatch(r"\+?[0-9]{5,20}", a)]
            if bad:
                problems.append(f"{where(jp)}: not a phone number: {', '.join(bad)}")
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
    channels = [
        msgspec.structs.replace(
            ch,
            url_file=rel(ch.url_file),
            secret_file=rel(ch.secret_file),
            token_file=rel(ch.token_file),
            smtp_password_file=rel(ch.smtp_password_file),
        )
        for ch in cfg.notify.channels
    ]
    g = cfg.grid
    grid = msgspec.structs.replace(
        g,
        key_file=rel(g.key_file),
        ca_file=rel(g.ca_file),
        client_cert_file=rel(g.client_cert_file),
        client_key_file=rel(g.client_key_file),
    )
    return msgspec.structs.replace(
        cfg,
        source=str(p),
        grid=grid,
        data_dir=str((base / cfg.data_dir).resolve()),
        mqtt=msgspec.structs.replace(m, password_file=rel(m.password_file), tls=tls),
        scrape_token_file=rel(cfg.scrape_token_file) or "",
        store=msgspec.structs.replace(cfg.store, passfile=rel(cfg.store.passfile) or ""),
        notify=msgspec.structs.replace(cfg.notify, channels=channels),
    )
