"""Serial-port diagnostics for the installer: which ports there are, who may open one, and which process
holds it (the daemon, a terminal program) before a live check opens it."""

from __future__ import annotations

import errno
import fcntl
import glob
import grp
import os
import pwd
import re
import stat
from pathlib import Path

from gateway.tooling.provision.base import ProvisionError

# ---------------------------------------------------------------- serial ports


def serial_candidates() -> list[str]:
    """Serial ports this machine has, most likely first (stable by-id names, then plain names)."""
    found = sorted(glob.glob("/dev/serial/by-id/*"))
    for pattern in ("/dev/ttyUSB*", "/dev/ttyACM*", "/dev/ttyAMA*", "/dev/serial0", "/dev/serial1", "/dev/ttyS[0-3]"):
        found.extend(sorted(glob.glob(pattern)))
    return found


def is_url(port: str) -> bool:
    return "://" in port


def permission_message(
    port: str, *, owner: str, group: str, mode: int, user: str, session_groups: set[str], member_of: set[str]
) -> str:
    """Why ``user`` cannot open ``port`` and what to do; the group memberships are passed in so that
    every case can be tested without changing the machine's users."""
    perms = stat.filemode(mode)
    if group in member_of and group not in session_groups:
        return (
            f"no permission to open {port}: you ({user}) are in the {group} group, but this login session "
            f"started before you were added; log out and back in (or run `newgrp {group}`)"
        )
    if group == "dialout":
        return (
            f"no permission to open {port} ({owner}:{group} {perms}): you ({user}) are not in the dialout "
            "group; add yourself to the dialout group: sudo usermod -aG dialout $USER (then log out and back in)"
        )
    return (
        f"no permission to open {port} ({owner}:{group} {perms}); run as a user in group {group}, or give "
        f"the port to the dialout group with a udev rule"
    )


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
    return permission_message(
        port, owner=owner, group=group, mode=st.st_mode, user=user, session_groups=session, member_of=member_of
    )


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
        hint = (
            f"serial ports here: {', '.join(here)}"
            if here
            else "no serial ports found: is the adapter plugged in? `dmesg | tail` shows what the kernel saw"
        )
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
        return (
            f"serial port {port} is busy ({who}): a login console runs on it; turn the serial console off "
            "(Raspberry Pi: sudo raspi-config, Interface Options, Serial Port: no login shell, port enabled)"
        )
    return (
        f"serial port {port} is busy ({who}); stop that program first (the gateway itself: "
        "sudo systemctl stop gatehouse-gateway)"
    )
