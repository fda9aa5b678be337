"""Every `gatehouse` command whose output is piped to `head` (or a pager quit early) ends quietly: no
traceback, the exit status of a process stopped by SIGPIPE. The real command, on a real pipe whose reader
has already gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_into_closed_pipe(*args: str) -> tuple[int, str]:
    """Run ``python -m gateway.cli ARGS`` with stdout a pipe whose read end is closed before it starts, so its
    first write meets EPIPE for certain (``| head -1`` is a race: short output fits the pipe's buffer)."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run(
            [sys.executable, "-m", "gateway.cli", *args],
            stdout=w,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            timeout=60,
            text=True,
        )
    finally:
        os.close(w)
    return p.returncode, p.stderr


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pipes")
    f = d / "gateway.yaml"
    f.write_text(
        "site: estate-a\ngateway: gw-1\nbuses:\n  - {name: b1, kind: modbus-tcp, host: 127.0.0.1, port: 502}\n"
        "devices:\n  - {name: p1, profile: perimeter-panel-8, bus: b1, unit: 1}\n"
        "zones:\n  - {name: z1, device: p1, point: zone1_alarm}\n"
    )
    return f


def test_help_into_a_closed_pipe(cfg: Path) -> None:
    rc, err = run_into_closed_pipe("--help")  # argparse itself ignores the failed write
    assert (rc, err) == (0, "")


@pytest.mark.parametrize(
    "args",
    [
        ["config", "check", "{cfg}"],
        ["device", "list", "--config", "{cfg}"],
        ["device", "show", "p1", "--config", "{cfg}"],
        ["device", "show", "p1", "--config", "{cfg}", "--json"],
    ],
    ids=lambda a: " ".join(a).replace("{cfg}", "CFG"),
)
def test_output_piped_to_a_reader_that_left(cfg: Path, args: list[str]) -> None:
    rc, err = run_into_closed_pipe(*(a.format(cfg=cfg) for a in args))
    assert "Traceback" not in err, err
    assert "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert rc == 128 + 13, (rc, err)


def test_head_of_a_long_listing_through_the_shell(cfg: Path) -> None:
    """As typed: `gatehouse device show ... | head -n 2` prints two lines and nothing on stderr."""
    p = subprocess.run(
        f"{sys.executable} -m gateway.cli device show p1 --config {cfg} | head -n 2",
        shell=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert p.returncode == 0
    assert len(p.stdout.splitlines()) == 2
    assert p.stderr == ""
