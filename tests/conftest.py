"""Shared fixtures: a real Mosquitto per test, and a leak check on every test (tasks, threads, children)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gateway.broker import MosquittoProcess

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A Mosquitto of our own on a free loopback port, persistence in the test's folder."""
    b = MosquittoProcess(tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves behind threads, child processes or (async) unfinished tasks."""
    threads_before = {t.ident for t in threading.enumerate()}
    me = psutil.Process()
    children_before = {c.pid for c in me.children(recursive=True)}
    yield
    deadline_threads = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    for t in deadline_threads:
        t.join(timeout=2.0)
    leaked_threads = [t.name for t in deadline_threads if t.is_alive() and not t.daemon]
    leaked_children = []
    for c in me.children(recursive=True):
        if c.pid in children_before:
            continue
        try:
            c.wait(timeout=2.0)
        except psutil.TimeoutExpired:
            leaked_children.append(f"{c.pid} {' '.join(c.cmdline()[:4])}")
            c.kill()
        except psutil.NoSuchProcess:
            pass
    assert not leaked_threads, f"test leaked threads: {leaked_threads}"
    assert not leaked_children, f"test leaked child processes: {leaked_children}"


@pytest.fixture(autouse=True)
async def no_task_leaks() -> None:
    """Fail an async test that leaves tasks running on its loop."""
    yield  # type: ignore[misc]
    me = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    if pending:
        await asyncio.sleep(0.05)
        pending = [t for t in pending if not t.done()]
    for t in pending:
        t.cancel()
    assert not pending, f"test leaked tasks: {[t.get_name() for t in pending]}"
