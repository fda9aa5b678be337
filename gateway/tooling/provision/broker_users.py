"""``gatehouse broker add-user``: gateway and portal users in Mosquitto's password file."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from gateway.tooling.provision.base import ProvisionError, check_broker_user, edit_lock

# ---------------------------------------------------------------- broker credentials


def find_mosquitto_passwd() -> str:
    for cand in (shutil.which("mosquitto_passwd"), "/usr/bin/mosquitto_passwd"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise ProvisionError("mosquitto_passwd is not installed (sudo apt-get install mosquitto)")


def add_broker_user(
    passwd_file: str | os.PathLike[str], user: str, *, password: str | None = None, force: bool = False
) -> str:
    """Add ``user`` to Mosquitto's password file with mosquitto_passwd; return the password.

    A new file gets mode 0600 (owned by the ``mosquitto`` user when run as root, so the broker can
    read it after dropping privileges); an existing file keeps its owner and mode."""
    check_broker_user(user)
    path = Path(passwd_file)
    tool = find_mosquitto_passwd()
    pw = password if password is not None else secrets.token_urlsafe(24)
    pw = pw.strip()
    if not pw or "\n" in pw or ":" in user:
        raise ProvisionError("the password must be one non-empty line")
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    with edit_lock(path):  # two users added at once: both kept
        _add_locked(path, folder, tool, user, pw, force)
    return pw


def _add_locked(path: Path, folder: Path, tool: str, user: str, pw: str, force: bool) -> None:
    if path.exists():
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(line.split(":", 1)[0] == user for line in text.splitlines()) and not force:
            raise ProvisionError(f"{path} already has a user {user!r}; use --force to give it a new password")
    # mosquitto_passwd rewrites the file; work on a private copy, then put it in place with the right mode.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
    os.close(fd)
    try:
        os.chmod(tmp, 0o600)
        if path.exists():
            shutil.copyfile(path, tmp)
        # The password goes in on stdin (twice: it asks again), never on a command line others can read.
        done = subprocess.run(
            [tool, tmp, user], input=f"{pw}\n{pw}\n", capture_output=True, text=True, timeout=30, check=False
        )
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
