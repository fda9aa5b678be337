"""Shared fixtures: a real Mosquitto per test, and a leak check on every test (tasks, threads, children)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from gateway.tooling.broker import MosquittoProcess
from portal.store import Postgres
from tests.pg_support import PostgresServer, shared_server, stop_shared_server

pytest_plugins = ["tests.tiers"]  # the `process` marker: which tests start a process (`make check` skips them)

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


def _resource_tracker(c: psutil.Process) -> bool:
    """Python's own multiprocessing resource tracker: started once per process by the first spawn-context pool (the
    plate sheets' workers) and ended with it, not a leak."""
    try:
        return "multiprocessing.resource_tracker" in " ".join(c.cmdline())
    except psutil.Error:
        return False


def _ends_within(c: psutil.Process, timeout: float) -> bool:
    """Whether a child has ended (or is a zombie) within ``timeout``, seen without reaping it: its exit status stays
    for whoever started it (psutil's wait() would reap it, and the starter's own wait, or one of a later child that
    reused the pid, would then see a stranger's status: asyncio's "Unknown child process pid ... returncode 255")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if c.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


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
        if c.pid in children_before or _resource_tracker(c):
            continue
        if not _ends_within(c, 2.0):
            with contextlib.suppress(psutil.Error):
                leaked_children.append(f"{c.pid} {' '.join(c.cmdline()[:4])}")
                c.kill()
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


# ---------------------------------------------------------------- PostgreSQL (the portal's shared store)


@pytest.fixture(scope="session", autouse=True)
def _stop_postgres() -> Iterator[None]:
    """The session's PostgreSQL server (if a test started it) ends with the session."""
    yield
    stop_shared_server()


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    """One PostgreSQL server for the session (each xdist worker's own): initdb + pg_ctl in a temporary folder, on a
    free loopback port."""
    return shared_server()


@pytest.fixture
def pg_target(postgres: PostgresServer) -> Iterator[Postgres]:
    """A database of this test's own on the session's server."""
    target = postgres.new_database()
    try:
        yield target
    finally:
        postgres.drop_database(target)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | Postgres:
    """The portal's store on each engine in turn: a SQLite file in the test's folder, or a PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "portal.db"
    target: Postgres = request.getfixturevalue("pg_target")
    return target


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], Path | Postgres]]:
    """``new_store(name)``: a store of its own for each name, on each engine in turn (SQLite files in the test's
    folder, or PostgreSQL databases dropped after the test)."""
    made: list[Postgres] = []

    def new(name: str) -> Path | Postgres:
        if request.param == "sqlite":
            return tmp_path / name
        server: PostgresServer = request.getfixturevalue("postgres")
        made.append(server.new_database())
        return made[-1]

    try:
        yield new
    finally:
        for target in made:
            shared_server().drop_database(target)
