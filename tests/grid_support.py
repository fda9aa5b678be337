"""Helpers for the grid-link tests: the shared key, the portal's grid config, the grid-platform stub process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.stubs import Stub, start_stub

KEY = "grid-shared-key-0123456789abcdef"
GRID_CODE = "330802001001"
ADDRESS = "浙江省衢州市柯城区荷花街道阳光花园"


def key_file(folder: Path, text: str = KEY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "grid.key"
    p.write_text(text + "\n")
    p.chmod(0o600)
    return p


def grid_yaml(
    folder: Path,
    url: str,
    *,
    tick_s: float = 0.05,
    timeout_s: float = 1.0,
    retry_first_s: float = 5,
    retry_max_s: float = 300,
    more: str = "",
    site: str = "s1",
) -> str:
    """The portal's ``grid:`` section for a platform at ``url`` (``site`` reports up)."""
    return f"""
grid:
  url: {url}
  key_file: {key_file(folder)}
  key_id: gatehouse
  tick_s: {tick_s}
  timeout_s: {timeout_s}
  retry_first_s: {retry_first_s}
  retry_max_s: {retry_max_s}
  sites: [{{site: {site}, grid_code: "{GRID_CODE}", address: {ADDRESS}, lat: 28.97, lon: 118.87}}]
{more}"""


async def grid_stub(folder: Path, *args: str) -> Stub:
    return await start_stub("firmware_stubs.grid_platform", "--key-file", str(key_file(folder)), *args)


async def records(stub: Stub) -> dict[str, Any]:
    return dict((await stub.state())["records"])
