"""The few steps of the suite that need root outside any namespace (mount a small tmpfs, give a port to the dialout
group, run a command as another user): run as they are when the suite runs as root, through ``sudo -n`` otherwise.
``make test`` asks for the password once up front (``sudo -v``), so a normal user with sudo rights runs the whole
suite; without them, these tests fail saying so (no skip hides them)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def root_args(args: list[str]) -> list[str]:
    """``args`` run as root: as they are for root, through ``sudo -n`` for anyone else."""
    if os.geteuid() == 0:
        return args
    if shutil.which("sudo") is None:
        pytest.fail(
            f"`{' '.join(args[:3])}` needs root: install sudo and run `make test` (it asks once, `sudo -v`)",
            pytrace=False,
        )
    return ["sudo", "-n", "--", *args]


def as_root(args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``args`` as root (see :func:`root_args`); with ``check``, fail the test saying what was refused."""
    r = subprocess.run(root_args(args), capture_output=True, text=True, check=False, timeout=60)
    if check and r.returncode != 0:
        pytest.fail(
            f"`{' '.join(args)}` as root failed ({r.returncode}): {r.stderr.strip()} (a normal user needs "
            "sudo rights: `make test` runs `sudo -v` first)",
            pytrace=False,
        )
    return r
