"""The portal's configuration: one YAML file, validated once, strictly, at start-up.

Unknown keys are errors and every error names the file (and the line where it can be found).
Relative paths in the file are relative to the file's folder.
"""

from __future__ import annotations

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


class StoreConfig(_Strict):
    path: str = "portal.db"  # relative to data_dir
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 256  # queued writes committed in one transaction
    queue_max: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000


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


class PortalConfig(_Strict):
    site_name: str = "Gatehouse"
    # The address residents' phones reach the portal at, printed in every plate's QR ("https://wy.example.cn").
    # Empty: the address the admin's browser used when the plate was rendered.
    public_url: str = ""
    phone: PhoneConfig = msgspec.field(default_factory=PhoneConfig)
    doors: DoorsConfig = msgspec.field(default_factory=DoorsConfig)
    data_dir: str = "."
    listen: ListenConfig = msgspec.field(default_factory=ListenConfig)
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    gateways: list[GatewayRef] = []
    sessions: SessionConfig = msgspec.field(default_factory=SessionConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    cookie_secure: bool = False  # true when the portal is reached over TLS (a reverse proxy)
    # Extra origins accepted on state-changing requests and WebSockets besides the portal's own
    # (e.g. "https://portal.example.cn" behind a proxy that rewrites Host).
    allowed_origins: list[str] = []
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
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(f"{where('$.timezone')}: unknown time zone {cfg.timezone!r} (e.g. Asia/Shanghai)")
    if cfg.mqtt.password_file and not cfg.mqtt.username:
        problems.append(f"{where('$.mqtt')}: password_file given without username")
    if cfg.mqtt.reconnect_max_s < cfg.mqtt.reconnect_min_s:
        problems.append(f"{where('$.mqtt.reconnect_max_s')}: reconnect_max_s is below reconnect_min_s")
    if cfg.sessions.absolute_timeout_s < cfg.sessions.idle_timeout_s:
        problems.append(f"{where('$.sessions.absolute_timeout_s')}: absolute timeout is below the idle timeout")
    if cfg.public_url and not re.fullmatch(r"https?://[^/\s]+(/[^\s?#]*)?", cfg.public_url):
        problems.append(f"{where('$.public_url')}: {cfg.public_url!r} is not a URL like https://host[:port][/path]")
    for i, o in enumerate(cfg.allowed_origins):
        if not re.fullmatch(r"https?://[^/\s]+", o):
            problems.append(f"{where(f'$.allowed_origins[{i}]')}: {o!r} is not an origin like https://host[:port]")
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
