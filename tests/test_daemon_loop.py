"""The daemon's event loop: the standard library's by default, uvloop on request (GATEHOUSE_EVENT_LOOP)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop  # in the test extra: a missing uvloop fails here, loudly

from gateway.daemon import DEFAULT_LOOP, LOOP_ENV, loop_factory


def test_the_loop_is_chosen_by_name_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOOP_ENV, raising=False)
    assert loop_factory("asyncio") is None
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert DEFAULT_LOOP == "asyncio" and loop_factory() is None
    monkeypatch.setenv(LOOP_ENV, "uvloop")
    assert loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv(LOOP_ENV, "asyncio")
    assert loop_factory() is None
    monkeypatch.setenv(LOOP_ENV, "tokio")
    with pytest.raises(ValueError, match="'uvloop' or 'asyncio'"):
        loop_factory()


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_each_loop_runs_a_coroutine(name: str) -> None:
    with asyncio.Runner(loop_factory=loop_factory(name)) as runner:
        kind = runner.run(_loop_kind())
    assert kind == name


async def _loop_kind() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__.split(".")[0]
