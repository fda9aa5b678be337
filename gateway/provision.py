"""Provisioning: ``gatehouse init``, ``gatehouse device add|list|show|remove`` and broker credentials.

Device edits go through ruamel's round-trip mode, so the installer's comments and layout survive.
Every edited config is validated with :func:`gateway.config.load` before it replaces the old file
(written to a temporary file in the same folder, then renamed). Files holding secrets get mode 0600.

Errors are :class:`ProvisionError` with a message that says what is wrong and what to do about it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import grp
import io
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args, get_type_hints

import msgspec
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from gateway import config
from gateway.wire import NAME_RE

SECRETS_DIR = "secrets"
KEYS_DIR = "keys"
MQTT_PASSWORD_FILE = f"{SECRETS_DIR}/mqtt.password"
PASS_KEY_FILE = f"{KEYS_DIR}/portal-pass.pub"
BROKER_CA_FILE = f"{KEYS_DIR}/broker-ca.pem"
DEFAULT_DATA_DIR = "/var/lib/gatehouse"
BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
ZONE_TYPES: tuple[str, ...] = get_args(get_type_hints(config.ZoneConfig)["type"])
#: The broker user the portal connects as (systemd/gatehouse.acl gives it its own rules).
PORTAL_USER = "portal"


class ProvisionError(Exception):
    """An installer's mistake or a refused operation; the message says what to do."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


# ---------------------------------------------------------------- files


def write_file(path: Path, data: bytes, mode: int, *, owner: tuple[int, int] | None = None) -> None:
    """Write atomically (temp file in the same folder, fsync, rename) with ``mode`` from the start."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _owner(spec: str | None) -> tuple[int, int] | None:
    """``user`` or ``user:group`` to (uid, gid); None keeps the invoking user's."""
    if not spec:
        return None
    user, _, group = spec.partition(":")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ProvisionError(f"no such user {user!r} (the install script creates 'gatehouse')") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ProvisionError(f"no such group {group!r}") from None
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        raise ProvisionError(f"only root can give files to {user!r}: run it with sudo")
    return pw.pw_uid, gid


def _scalar(value: str) -> str:
    """A YAML scalar for ``value``: plain when YAML reads it back as the same string, else quoted."""
    y = YAML(typ="safe")
    try:
        if value and value.strip() == value and y.load(value) == value and ": " not in value and " #" not in value:
            return value
    except Exception:  # anything YAML cannot read plainly gets quoted
        pass
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\s]+):(\d{1,5})", text.strip())
    if not m:
        raise ProvisionError(f"{what} {text!r} is not host:port (e.g. 192.168.1.20:502)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise ProvisionError(f"{what} {text!r}: port must be 1-65535")
    return host, port


def _check_name(kind: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise ProvisionError(
            f"{kind} name {value!r} is not valid: use letters, digits, '.', '_' and '-' (at most 64, "
            "starting with a letter or digit)")
    return value


# ---------------------------------------------------------------- init


@dataclass
class InitResult:
    config: Path
    written: list[Path] = field(default_factory=list)
    generated_password: str | None = None  # shown once to the installer; None when one was given


def init_gateway(
    config_path: str | os.PathLike[str],
    *,
    site: str,
    gateway: str,
    broker: str = "127.0.0.1:1883",
    mqtt_user: str | None = None,
    mqtt_password: str | None = None,
    pass_keys: Sequence[str] = (),
    tls_ca: str | None = None,
    data_dir: str = DEFAULT_DATA_DIR,
    owner: str | None = None,
    force: bool = False,
) -> InitResult:
    """Write a new gateway config with its secrets folder. ``mqtt_password`` None generates one."""
    from gateway.wire.passes import KeyFileError, load_public_key

    _check_name("site", site)
    _check_name("gateway", gateway)
    user = _check_name("MQTT user", mqtt_user or gateway)
    host, port = parse_host_port(broker, "--broker")
    uid_gid = _owner(owner)
    cfg = Path(config_path)
    folder = cfg.parent if str(cfg.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    password_path = folder / MQTT_PASSWORD_FILE
    key_path = folder / PASS_KEY_FILE
    ca_path = folder / BROKER_CA_FILE
    targets = [cfg, password_path] + ([key_path] if pass_keys else []) + ([ca_path] if tls_ca else [])
    if not force:
        existing = [str(p) for p in targets if p.exists()]
        if existing:
            raise ProvisionError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                                 "use --force to replace")
    if len(pass_keys) > 1:
        raise ProvisionError("give one --pass-key at init; add more to access.public_keys while rotating keys")
    key_pem = None
    if pass_keys:
        try:
            load_public_key(pass_keys[0])
        except KeyFileError as e:
            raise ProvisionError(f"--pass-key: {e}") from None
        key_pem = Path(pass_keys[0]).read_bytes()
    ca_pem = None
    if tls_ca:
        try:
            ca_pem = Path(tls_ca).read_bytes()
        except OSError as e:
            raise ProvisionError(f"--tls-ca: cannot read {tls_ca}: {e.strerror or e}") from None
        if b"BEGIN CERTIFICATE" not in ca_pem:
            raise ProvisionError(f"--tls-ca: {tls_ca} is not a PEM certificate")
    password = mqtt_password
    generated = None
    if password is None:
        password = generated = secrets.token_urlsafe(24)
    password = password.strip()
    if not password or "\n" in password:
        raise ProvisionError("the MQTT password must be one non-empty line")

    text = _config_text(site=site, gateway=gateway, host=host, port=port, user=user, data_dir=data_dir,
                        with_key=key_pem is not None, with_ca=ca_pem is not None)
    result = InitResult(cfg)
    secrets_dir = folder / SECRETS_DIR
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    if uid_gid:
        os.chown(secrets_dir, *uid_gid)
    write_file(password_path, (password + "\n").encode(), 0o600, owner=uid_gid)
    result.written.append(password_path)
    if key_pem is not None or ca_pem is not None:
        (folder / KEYS_DIR).mkdir(mode=0o755, exist_ok=True)
    if key_pem is not None:
        write_file(key_path, key_pem, 0o644)
        result.written.append(key_path)
    if ca_pem is not None:
        write_file(ca_path, ca_pem, 0o644)
        result.written.append(ca_path)
    # Validate exactly what will be written, next to where it goes (relative paths resolve the same way).
    _validated_write(cfg, text, mode=0o644)
    result.written.insert(0, cfg)
    result.generated_password = generated
    return result


def _config_text(*, site: str, gateway: str, host: str, port: int, user: str, data_dir: str,
                 with_key: bool, with_ca: bool) -> str:
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    tls = f"\n  tls:\n    ca_file: {BROKER_CA_FILE}   # the broker's CA certificate" if with_ca else ""
    key = (f"  public_keys: [{PASS_KEY_FILE}]   # the portal's pass-signing public key (never the private one)"
           if with_key else
           "  public_keys: []   # the portal's pass-signing public key file(s); needed before readers work")
    return f"""\
# Gatehouse gateway configuration, written by `gatehouse init` on {today}.
# Check it with `gatehouse config check FILE`; add devices with `gatehouse device add`.
# Relative paths are relative to this file's folder.
site: {_scalar(site)}
gateway: {_scalar(gateway)}
data_dir: {_scalar(data_dir)}   # the event log and the outbox

mqtt:
  host: {_scalar(host)}
  port: {port}
  username: {_scalar(user)}
  password_file: {MQTT_PASSWORD_FILE}   # mode 0600, the password alone{tls}

access:
{key}

local_api:   # `gatehouse status` and Prometheus `GET /metrics`; keep it on loopback
  enabled: true
  host: 127.0.0.1
  port: 9880
"""


def _validated_write(path: Path, text: str, *, mode: int | None = None) -> config.GatewayConfig:
    """Validate ``text`` as the config at ``path`` and put it there; errors name ``path``."""
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            cfg = config.load(tmp)
        except config.ConfigError as e:
            problems = [p.replace(tmp, str(path)) for p in e.problems]
            raise ProvisionError("the edited config would not be valid; nothing was written", problems) from None
        try:
            st = path.stat()
            os.chmod(tmp, stat.S_IMODE(st.st_mode) if mode is None else mode)
            if os.geteuid() == 0:
                os.chown(tmp, st.st_uid, st.st_gid)
        except FileNotFoundError:
            os.chmod(tmp, 0o644 if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return msgspec.structs.replace(cfg, source=str(path))


# ---------------------------------------------------------------- editing a config


class ConfigDoc:
    """A gateway config opened for editing: the round-trip tree and the validated config."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ProvisionError(f"{self.path} does not exist: create it with `gatehouse init --config {self.path}`")
        try:
            self.cfg = config.load(self.path)
        except config.ConfigError as e:
            raise ProvisionError(
                f"{self.path} has errors; fix them first (`gatehouse config check {self.path}`)", e.problems) from None
        self._yaml = YAML(typ="rt")
        self._yaml.allow_duplicate_keys = False
        self._yaml.indent(mapping=2, sequence=4, offset=2)
        self._yaml.width = 120
        self._yaml.preserve_quotes = True
        self.tree: CommentedMap = self._yaml.load(self.path.read_text(encoding="utf-8"))

    def section(self, key: str) -> CommentedSeq:
        seq = self.tree.get(key)
        if seq is None:
            seq = CommentedSeq()
            self.tree[key] = seq
        elif not isinstance(seq, CommentedSeq):
            raise ProvisionError(f"{self.path}: '{key}' must be a list")
        if not seq:
            seq.fa.set_block_style()
        return seq

    def entries(self, key: str) -> list[CommentedMap]:
        seq = self.tree.get(key)
        return [e for e in seq if isinstance(e, CommentedMap)] if isinstance(seq, list) else []

    def find(self, key: str, name: str) -> CommentedMap | None:
        return next((e for e in self.entries(key) if e.get("name") == name), None)

    def remove(self, key: str, entry: CommentedMap) -> None:
        seq = self.tree[key]
        for i, e in enumerate(seq):
            if e is entry:
                del seq[i]
                return

    def text(self) -> str:
        buf = io.StringIO()
        self._yaml.dump(self.tree, buf)
        return buf.getvalue()

    def save(self) -> config.GatewayConfig:
        self.cfg = _validated_write(self.path, self.text())
        return self.cfg


def _flow(items: Mapping[str, Any]) -> CommentedMap:
    m = CommentedMap(items)
    m.fa.set_flow_style()
    return m


# ---------------------------------------------------------------- serial ports


def serial_candidates() -> list[str]:
    """Serial ports this machine has, most likely first (stable by-id names, then plain names)."""
    found = sorted(glob.glob("/dev/serial/by-id/*"))
    for pattern in ("/dev/ttyUSB*", "/dev/ttyACM*", "/dev/ttyAMA*", "/dev/serial0", "/dev/serial1", "/dev/ttyS[0-3]"):
        found.extend(sorted(glob.glob(pattern)))
    return found


def is_url(port: str) -> bool:
    return "://" in port


def permission_message(port: str, *, owner: str, group: str, mode: int, user: str, session_groups: set[str],
                       member_of: set[str]) -> str:
    """Why ``user`` cannot open ``port`` and what to do; the group memberships are passed in so that
    every case can be tested without changing the machine's users."""
    perms = stat.filemode(mode)
    if group in member_of and group not in session_groups:
        return (f"no permission to open {port}: you ({user}) are in the {group} group, but this login session "
                f"started before you were added; log out and back in (or run `newgrp {group}`)")
    if group == "dialout":
        return (f"no permission to open {port} ({owner}:{group} {perms}): you ({user}) are not in the dialout "
                "group; add yourself to the dialout group: sudo usermod -aG dialout $USER (then log out and back in)")
    return (f"no permission to open {port} ({owner}:{group} {perms}); run as a user in group {group}, or give "
            f"the port to the dialout group with a udev rule")


def _who_can_not_open(port: str, st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        g = grp.getgrgid(st.st_gid)
        group, members = g.gr_name, set(g.gr_mem)
    except KeyError:
        group, members = str(st.st_gid), set()
    session = set()
    for gid in [*os.getgroups(), os.getegid()]:
        try:
            session.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    member_of = set(session)
    if user in members:
        member_of.add(group)
    try:
        if pwd.getpwnam(user).pw_gid == st.st_gid:
            member_of.add(group)
    except KeyError:
        pass
    return permission_message(port, owner=owner, group=group, mode=st.st_mode, user=user,
                              session_groups=session, member_of=member_of)


def _holds_pty_master(fd_dir: str, links: dict[str, str], index: int) -> bool:
    """Whether the process owning ``fd_dir`` holds the master side of pseudo-terminal ``index``."""
    for fd, link in links.items():
        if link in ("/dev/ptmx", "/dev/pts/ptmx"):
            try:
                info = Path(fd_dir.replace("/fd", "/fdinfo"), fd).read_text()
            except OSError:
                continue
            if re.search(rf"^tty-index:\s*{index}$", info, re.M):
                return True
    return False


def port_holders(port: str) -> list[str]:
    """``pid (name)`` of the processes that have ``port`` open, as far as /proc lets us see. For a
    pseudo-terminal, the process holding its master side is the far end of the line (a simulator
    standing in for the device), not a competitor, and is left out."""
    try:
        target = os.path.realpath(port)
    except OSError:
        return []
    m = re.fullmatch(r"/dev/pts/(\d+)", target)
    pty_index = int(m.group(1)) if m else None
    out = []
    me = os.getpid()
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        pid = int(fd_dir.split("/")[2])
        if pid == me:
            continue
        try:
            links = {fd: os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)}
        except OSError:
            continue
        if target in links.values():
            if pty_index is not None and _holds_pty_master(fd_dir, links, pty_index):
                continue
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                name = "?"
            out.append(f"{pid} ({name})")
    return out


def check_serial_port(port: str, *, check_busy: bool = True) -> None:
    """Raise :class:`ProvisionError` if ``port`` does not exist, cannot be opened by us, or (with
    ``check_busy``) is held by another process. pyserial URLs (``socket://...``) are not checked."""
    if is_url(port):
        return
    try:
        st = os.stat(port)
    except FileNotFoundError:
        here = serial_candidates()
        hint = (f"serial ports here: {', '.join(here)}" if here else
                "no serial ports found: is the adapter plugged in? `dmesg | tail` shows what the kernel saw")
        raise ProvisionError(f"serial port {port} does not exist ({hint})") from None
    except PermissionError:
        raise ProvisionError(f"no permission to look at {port}") from None
    if not stat.S_ISCHR(st.st_mode):
        raise ProvisionError(f"{port} is not a serial port (not a character device)")
    if not os.access(port, os.R_OK | os.W_OK):
        raise ProvisionError(_who_can_not_open(port, st))
    if not check_busy:
        return
    try:
        fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise ProvisionError(_busy_message(port)) from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise ProvisionError(_who_can_not_open(port, st)) from None
        raise ProvisionError(f"cannot open serial port {port}: {e.strerror}") from None
    try:
        # The lock pyserial takes with exclusive=True; a program that opened the port without it is
        # found in /proc (as far as we may look there).
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ProvisionError(_busy_message(port)) from None
    finally:
        os.close(fd)
    holders = port_holders(port)
    if holders:
        raise ProvisionError(_busy_message(port, holders))


def _busy_message(port: str, holders: list[str] | None = None) -> str:
    holders = port_holders(port) if holders is None else holders
    who = f"held by {', '.join(holders)}" if holders else "another process holds it"
    if any("getty" in h for h in holders):
        return (f"serial port {port} is busy ({who}): a login console runs on it; turn the serial console off "
                "(Raspberry Pi: sudo raspi-config, Interface Options, Serial Port: no login shell, port enabled)")
    return (f"serial port {port} is busy ({who}); stop that program first (the gateway itself: "
            "sudo systemctl stop gatehouse-gateway)")


# ---------------------------------------------------------------- devices


@dataclass
class PointMapping:
    point: str
    name: str
    opts: dict[str, str]


def parse_mapping(text: str, what: str, allowed: Mapping[str, bool]) -> PointMapping:
    """``POINT=NAME[,key=value][,flag]``; ``allowed`` maps each option to True if it is a bare flag."""
    head, *rest = text.split(",")
    point, sep, name = head.partition("=")
    if not sep or not point.strip() or not name.strip():
        raise ProvisionError(f"{what} {text!r}: expected POINT=NAME[,option=value...]")
    opts: dict[str, str] = {}
    for item in rest:
        k, eq, v = item.partition("=")
        k = k.strip()
        if k not in allowed:
            raise ProvisionError(f"{what} {text!r}: unknown option {k!r} (options: {', '.join(allowed)})")
        if allowed[k] and eq:
            raise ProvisionError(f"{what} {text!r}: {k} takes no value")
        if not allowed[k] and not eq:
            raise ProvisionError(f"{what} {text!r}: {k} needs a value ({k}=...)")
        opts[k] = v.strip() if eq else "true"
    return PointMapping(point.strip(), name.strip(), opts)


ZONE_OPTIONS = {"type": False, "label": False, "group": False, "invert": True}
DOOR_OPTIONS = {"contact": False, "exit": False, "label": False, "gate": True}


def parse_place(text: str | None) -> dict[str, str] | None:
    """``building[/unit[/house]]``."""
    if not text:
        return None
    parts = text.split("/")
    if len(parts) > 3 or not all(parts):
        raise ProvisionError(f"--place {text!r}: expected BUILDING[/UNIT[/HOUSE]], e.g. 3/2/1201")
    for p in parts:
        _check_name("place", p)
    return dict(zip(("building", "unit", "house"), parts, strict=False))


@dataclass
class BusRequest:
    """Which bus a new device goes on: an existing one by name, or a serial port or TCP endpoint."""

    name: str | None = None
    serial: str | None = None
    tcp: str | None = None
    rtu_over_tcp: bool = False
    baudrate: int | None = None
    parity: str | None = None
    stopbits: int | None = None
    timeout_ms: int | None = None


@dataclass
class AddResult:
    device: str
    bus: str
    bus_created: bool
    zones: list[str]
    doors: list[str]


def _known_profiles(extra_dir: str | None) -> str:
    from devices.profiles import list_profiles

    return ", ".join(list_profiles(extra_dir)) or "none"


def _profile(name: str, extra_dir: str | None) -> Any:
    from devices.profiles import ProfileError, find_profile, list_profiles

    if name not in list_profiles(extra_dir):
        raise ProvisionError(f"no profile {name!r}; known profiles: {_known_profiles(extra_dir)}")
    try:
        return find_profile(name, extra_dir=extra_dir)
    except ProfileError as e:
        raise ProvisionError(f"profile {name!r} cannot be used: {e}") from None


def _bus_settings(bus: Mapping[str, Any]) -> str:
    if bus.get("kind") == "modbus-rtu":
        return (f"{bus.get('serial')} {bus.get('baudrate', 9600)} 8{bus.get('parity', 'N')}"
                f"{bus.get('stopbits', 1)}")
    return f"{bus.get('host')}:{bus.get('port')} ({bus.get('kind')})"


def _resolve_bus(doc: ConfigDoc, req: BusRequest) -> tuple[CommentedMap, bool]:
    """The bus entry for ``req``: an existing one, or a new one (not yet added to the tree)."""
    buses = doc.entries("buses")
    names = ", ".join(str(b.get("name")) for b in buses) or "none"
    if req.serial and req.tcp:
        raise ProvisionError("give either --serial or --tcp, not both")
    serial_opts = {"--baud": req.baudrate, "--parity": req.parity, "--stopbits": req.stopbits}
    if not req.serial and not req.tcp:
        if not req.name:
            raise ProvisionError(f"say which bus: --bus NAME (buses: {names}), --serial PORT or --tcp HOST:PORT")
        bus = doc.find("buses", req.name)
        if bus is None:
            raise ProvisionError(f"no bus {req.name!r} (buses: {names}); to create it give --serial PORT "
                                 "or --tcp HOST:PORT as well")
        given = [k for k, v in serial_opts.items() if v is not None]
        if given:
            raise ProvisionError(f"{', '.join(given)} would change bus {req.name!r} ({_bus_settings(bus)}) for "
                                 "every device on it; edit the bus in the config instead")
        if bus.get("kind") == "modbus-rtu":
            check_serial_port(str(bus.get("serial")), check_busy=False)
        return bus, False
    if req.serial:
        port = req.serial
        existing = next((b for b in buses if b.get("kind") == "modbus-rtu" and b.get("serial") == port), None)
        if existing is None and not is_url(port):
            real = os.path.realpath(port)
            existing = next((b for b in buses if b.get("kind") == "modbus-rtu"
                             and os.path.realpath(str(b.get("serial"))) == real), None)
        if existing is not None:
            if req.name and req.name != existing.get("name"):
                raise ProvisionError(
                    f"{port} is already bus {existing.get('name')!r}; use --bus {existing.get('name')}")
            differ = [f"{k} {v}" for k, v, cur in (
                ("--baud", req.baudrate, existing.get("baudrate", 9600)),
                ("--parity", req.parity, existing.get("parity", "N")),
                ("--stopbits", req.stopbits, existing.get("stopbits", 1))) if v is not None and v != cur]
            if differ:
                raise ProvisionError(
                    f"bus {existing.get('name')!r} on {port} runs at {_bus_settings(existing)}; {', '.join(differ)} "
                    "differs, and every device on one RS-485 line must use the same settings")
            check_serial_port(port, check_busy=False)
            return existing, False
        name = req.name or _free_name(doc, "rs485-" + re.sub(r"[^A-Za-z0-9_.-]", "-", Path(port).name))
        if doc.find("buses", name) is not None:
            raise ProvisionError(f"bus {name!r} already exists on {_bus_settings(doc.find('buses', name) or {})}")
        check_serial_port(port, check_busy=True)
        bus = {"name": name, "kind": "modbus-rtu", "serial": port, "baudrate": req.baudrate or 9600}
        if req.parity and req.parity != "N":
            bus["parity"] = req.parity
        if req.stopbits and req.stopbits != 1:
            bus["stopbits"] = req.stopbits
    else:
        host, tport = parse_host_port(str(req.tcp), "--tcp")
        kind = "modbus-rtu-over-tcp" if req.rtu_over_tcp else "modbus-tcp"
        given = [k for k, v in serial_opts.items() if v is not None]
        if given:
            raise ProvisionError(f"{', '.join(given)}: serial settings belong to the serial server, not to a TCP bus")
        existing = next((b for b in buses if b.get("host") == host and b.get("port") == tport), None)
        if existing is not None:
            if existing.get("kind") != kind:
                raise ProvisionError(f"{host}:{tport} is already bus {existing.get('name')!r} of kind "
                                     f"{existing.get('kind')}, not {kind}")
            if req.name and req.name != existing.get("name"):
                raise ProvisionError(f"{host}:{tport} is already bus {existing.get('name')!r}; "
                                     f"use --bus {existing.get('name')}")
            return existing, False
        name = req.name or _free_name(doc, f"tcp-{host}-{tport}".replace(":", "-"))
        if doc.find("buses", name) is not None:
            raise ProvisionError(f"bus {name!r} already exists on {_bus_settings(doc.find('buses', name) or {})}")
        bus = {"name": name, "kind": kind, "host": host, "port": tport}
    if req.timeout_ms is not None:
        bus["timeout_ms"] = req.timeout_ms
    _check_name("bus", name)
    return _flow(bus), True


def _free_name(doc: ConfigDoc, base: str) -> str:
    base = base[:60]
    if doc.find("buses", base) is None:
        return base
    for i in range(2, 1000):
        if doc.find("buses", f"{base}-{i}") is None:
            return f"{base}-{i}"
    raise ProvisionError(f"too many buses named {base}-N")


def add_device(
    config_path: str | os.PathLike[str],
    name: str,
    *,
    profile: str,
    unit: int,
    bus: BusRequest,
    poll_ms: int | None = None,
    place: str | None = None,
    zones: Sequence[str] = (),
    doors: Sequence[str] = (),
) -> AddResult:
    doc = ConfigDoc(config_path)
    _check_name("device", name)
    prof = _profile(profile, doc.cfg.profiles_dir)
    if not 1 <= unit <= 247:
        raise ProvisionError(f"unit id {unit} is out of range: Modbus unit ids are 1-247 (0 is broadcast)")
    old = doc.find("devices", name)
    if old is not None:
        raise ProvisionError(f"device {name!r} already exists (bus {old.get('bus')}, unit {old.get('unit', 1)}); "
                             f"remove it first with `gatehouse device remove {name}`")
    bus_entry, created = _resolve_bus(doc, bus)
    bus_name = str(bus_entry["name"])
    for d in doc.entries("devices"):
        if d.get("bus") == bus_name and int(d.get("unit", 1)) == unit:
            raise ProvisionError(
                f"unit id {unit} on bus {bus_name!r} is already used by device {d.get('name')!r}; each device on "
                "a bus needs its own unit id (change it on the device, then add it with that id)")
    where = parse_place(place)
    zone_maps = [parse_mapping(z, "--zone", ZONE_OPTIONS) for z in zones]
    door_maps = [parse_mapping(d, "--door", DOOR_OPTIONS) for d in doors]
    points = prof.points

    def point_of(p: str, what: str) -> str:
        if p not in points:
            raise ProvisionError(f"{what}: profile {profile!r} has no point {p!r} (points: {', '.join(points)})")
        return p

    new_zones = []
    for z in zone_maps:
        point_of(z.point, "--zone")
        _check_name("zone", z.name)
        if doc.find("zones", z.name) is not None or any(n["name"] == z.name for n in new_zones):
            raise ProvisionError(f"--zone: a zone named {z.name!r} already exists")
        ztype = z.opts.get("type", "perimeter")
        if ztype not in ZONE_TYPES:
            raise ProvisionError(f"--zone {z.name}: type {ztype!r} is not one of {', '.join(ZONE_TYPES)}")
        entry: dict[str, Any] = {"name": z.name, "device": name, "point": z.point, "type": ztype}
        if "label" in z.opts:
            entry["label"] = z.opts["label"]
        if "group" in z.opts:
            entry["group"] = z.opts["group"]
        if "invert" in z.opts:
            entry["invert"] = True
        if where:
            entry["place"] = _flow(where)
        new_zones.append(entry)
    new_doors = []
    for d in door_maps:
        relay = points[point_of(d.point, "--door")]
        if not relay.writable:
            raise ProvisionError(f"--door {d.name}: point {d.point!r} is not writable (a door needs a relay output)")
        _check_name("door", d.name)
        if doc.find("doors", d.name) is not None or any(n["name"] == d.name for n in new_doors):
            raise ProvisionError(f"--door: a door named {d.name!r} already exists")
        entry = {"name": d.name, "device": name, "relay": d.point}
        if "contact" in d.opts:
            entry["contact"] = point_of(d.opts["contact"], "--door contact")
        if "exit" in d.opts:
            entry["exit_button"] = point_of(d.opts["exit"], "--door exit")
        if "gate" in d.opts:
            entry["gate"] = True
        if "label" in d.opts:
            entry["label"] = d.opts["label"]
        if where and "gate" not in d.opts and "unit" in where:
            entry["place"] = _flow({k: where[k] for k in ("building", "unit")})
        new_doors.append(entry)

    if created:
        doc.section("buses").append(bus_entry)
    dev: dict[str, Any] = {"name": name, "profile": profile, "bus": bus_name, "unit": unit}
    if poll_ms is not None:
        dev["poll_ms"] = poll_ms
    if where:
        dev["place"] = _flow(where)
    doc.section("devices").append(_flow(dev))
    for z in new_zones:
        doc.section("zones").append(_flow(z))
    for d in new_doors:
        doc.section("doors").append(_flow(d))
    doc.save()
    return AddResult(name, bus_name, created, [z["name"] for z in new_zones], [d["name"] for d in new_doors])


@dataclass
class RemoveResult:
    device: str
    zones: list[str]
    doors: list[str]
    bus_removed: str | None


def remove_device(config_path: str | os.PathLike[str], name: str, *, keep_bus: bool = False) -> RemoveResult:
    """Remove a device with the zones and doors mapped to it, and its bus if nothing else is on it."""
    doc = ConfigDoc(config_path)
    dev = doc.find("devices", name)
    if dev is None:
        names = ", ".join(str(d.get("name")) for d in doc.entries("devices")) or "none"
        raise ProvisionError(f"no device {name!r} (devices: {names})")
    zones = [z for z in doc.entries("zones") if z.get("device") == name]
    doors = [d for d in doc.entries("doors") if d.get("device") == name]
    for z in zones:
        doc.remove("zones", z)
    for d in doors:
        doc.remove("doors", d)
    doc.remove("devices", dev)
    bus_removed = None
    bus = doc.find("buses", str(dev.get("bus")))
    if bus is not None and not keep_bus and not any(d.get("bus") == bus.get("name") for d in doc.entries("devices")):
        doc.remove("buses", bus)
        bus_removed = str(bus.get("name"))
    doc.save()
    return RemoveResult(name, [str(z["name"]) for z in zones], [str(d["name"]) for d in doors], bus_removed)


def describe_devices(cfg: config.GatewayConfig) -> list[dict[str, Any]]:
    """Each device with its bus endpoint, place, zones and doors (for ``device list`` and ``show``)."""
    buses = {b.name: b for b in cfg.buses}
    out = []
    for d in cfg.devices:
        b = buses.get(d.bus)
        endpoint = ""
        if b is not None:
            endpoint = (f"{b.serial} {b.baudrate} 8{b.parity}{b.stopbits}" if b.kind == "modbus-rtu"
                        else f"{b.host}:{b.port}")
        place = "/".join(p for p in (d.place.building, d.place.unit, d.place.house) if p) if d.place else ""
        out.append({
            "name": d.name, "profile": d.profile, "bus": d.bus, "kind": b.kind if b else "", "endpoint": endpoint,
            "unit": d.unit, "poll_ms": d.poll_ms, "place": place,
            "zones": [{"name": z.name, "point": z.point, "type": z.type, "label": z.label}
                      for z in cfg.zones if z.device == d.name],
            "doors": [{"name": x.name, "relay": x.relay, "contact": x.contact, "exit_button": x.exit_button}
                      for x in cfg.doors if x.device == d.name],
        })
    return out


def iter_profile_points(profile: str, extra_dir: str | None) -> Iterator[dict[str, Any]]:
    prof = _profile(profile, extra_dir)
    for p in prof.points.values():
        yield {"name": p.name, "table": p.table, "address": p.address, "dtype": p.dtype, "kind": p.kind,
               "writable": p.writable, "group": p.group}


# ---------------------------------------------------------------- broker credentials


def find_mosquitto_passwd() -> str:
    for cand in (shutil.which("mosquitto_passwd"), "/usr/bin/mosquitto_passwd"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise ProvisionError("mosquitto_passwd is not installed (sudo apt-get install mosquitto)")


def add_broker_user(passwd_file: str | os.PathLike[str], user: str, *, password: str | None = None,
                    force: bool = False) -> str:
    """Add ``user`` to Mosquitto's password file with mosquitto_passwd; return the password.

    A new file gets mode 0600 (owned by the ``mosquitto`` user when run as root, so the broker can
    read it after dropping privileges); an existing file keeps its owner and mode."""
    _check_name("broker user", user)
    path = Path(passwd_file)
    tool = find_mosquitto_passwd()
    if path.exists():
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(line.split(":", 1)[0] == user for line in text.splitlines()) and not force:
            raise ProvisionError(f"{path} already has a user {user!r}; use --force to give it a new password")
    pw = password if password is not None else secrets.token_urlsafe(24)
    pw = pw.strip()
    if not pw or "\n" in pw or ":" in user:
        raise ProvisionError("the password must be one non-empty line")
    # mosquitto_passwd rewrites the file; work on a private copy, then put it in place with the right mode.
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
    os.close(fd)
    try:
        os.chmod(tmp, 0o600)
        if path.exists():
            shutil.copyfile(path, tmp)
        # The password goes in on stdin (twice: it asks again), never on a command line others can read.
        done = subprocess.run([tool, tmp, user], input=f"{pw}\n{pw}\n", capture_output=True, text=True,
                              timeout=30, check=False)
        if done.returncode != 0:
            raise ProvisionError(f"mosquitto_passwd failed: {(done.stderr or done.stdout).strip()}")
        if path.exists():
            st = path.stat()
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            if os.geteuid() == 0:
                os.chown(tmp, st.st_uid, st.st_gid)
        else:
            os.chmod(tmp, 0o600)
            if os.geteuid() == 0:
                try:
                    pw_ent = pwd.getpwnam("mosquitto")
                    os.chown(tmp, pw_ent.pw_uid, pw_ent.pw_gid)
                except KeyError:
                    pass
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return pw
