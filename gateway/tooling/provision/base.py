"""What the provisioning modules share: the error type, the file layout of a gateway's folder, writing files
with their modes and owners, and the names on the broker."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import re
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import get_args, get_type_hints

import msgspec
from ruamel.yaml import YAML

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
            "starting with a letter or digit)"
        )
    return value


PORTAL_BROKER_USER = "portal"


def broker_user(site: str, gateway: str) -> str:
    """A gateway's broker user: ``SITE/GATEWAY``. The ACL (systemd/gatehouse.acl) puts the user name in the topic
    (``gatehouse/v1/%u/...``), so a gateway's password writes only its own site's and its own name's topics, and
    two sites may each have a gateway of the same name without sharing a user."""
    return f"{site}/{gateway}"


def check_broker_user(user: str) -> str:
    """``portal``, or ``SITE/GATEWAY`` with both names valid; else ProvisionError."""
    if user == PORTAL_BROKER_USER:
        return user
    site, sep, gateway = user.partition("/")
    if not sep or not NAME_RE.match(site) or not NAME_RE.match(gateway):
        raise ProvisionError(
            f"broker user {user!r}: a gateway's user is SITE/GATEWAY (e.g. sunny-gardens/gw-b3), the portal's is "
            f"{PORTAL_BROKER_USER!r}"
        )
    return user


@contextlib.contextmanager
def edit_lock(path: Path) -> Iterator[None]:
    """Hold ``path``'s edit lock for a whole read-change-validate-replace: an exclusive flock on ``.NAME.lock`` beside
    it (the file itself will not do: each edit replaces it with a new inode). Two edits at once then run one after
    the other, the second reading what the first wrote, instead of both succeeding and one change being lost.
    The lock file stays (removing it would let a third edit lock a new file while the second holds the old one).
    Where it cannot be made (no folder, a folder this user may not write, a read-only or full file system) the edit
    goes on unlocked: it cannot replace the file either, and says why when it tries, after its other checks."""
    lock = path.parent / f".{path.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        try:  # someone else's lock file, or a read-only file system: a read-only descriptor locks as well
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def cannot_write(path: Path, e: OSError) -> ProvisionError:
    """``cannot write PATH: why — what to do`` for an installer whose edit could not be written."""
    folder = path.parent if str(path.parent) else Path(".")
    why = {
        errno.EACCES: "permission denied — run it with sudo",
        errno.EPERM: "permission denied — run it with sudo",
        errno.ENOSPC: f"no space left on the device — make room (df -h {folder}) and run it again",
        errno.EDQUOT: f"disk quota exceeded — make room (df -h {folder}) and run it again",
        errno.EROFS: "the file system is read-only — remount it read-write and run it again",
    }.get(e.errno or 0, e.strerror or str(e))
    return ProvisionError(f"cannot write {path}: {why}")


def _validated_write(path: Path, text: str, *, mode: int | None = None) -> config.GatewayConfig:
    """Validate ``text`` as the config at ``path`` and put it there; errors name ``path``. A file that cannot be
    written (no permission, a full disk, a read-only file system) is a :class:`ProvisionError` saying what to do,
    with the old file untouched."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".yaml")
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise cannot_write(path, e) from None
        try:
            cfg = config.load(tmp)
        except config.ConfigError as e:
            problems = [p.replace(tmp, str(path)) for p in e.problems]
            raise ProvisionError("the edited config would not be valid; nothing was written", problems) from None
        try:
            try:
                st = path.stat()
                os.chmod(tmp, stat.S_IMODE(st.st_mode) if mode is None else mode)
                if os.geteuid() == 0:
                    os.chown(tmp, st.st_uid, st.st_gid)
            except FileNotFoundError:
                os.chmod(tmp, 0o644 if mode is None else mode)
            os.replace(tmp, path)
        except OSError as e:
            raise cannot_write(path, e) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return msgspec.structs.replace(cfg, source=str(path))
