"""The two test tiers: ``process`` tests start a process (a broker, a stub, a portal or gateway, PostgreSQL, Chromium,
any subprocess); the rest start none and make ``make check``'s quick tier (``pytest -m "not process"``).

A test's tier is found, not declared: a test is marked ``process`` when it uses a fixture that starts one
(:data:`PROCESS_FIXTURES`, or the PostgreSQL side of a parametrised store), or when its code, its fixtures' code or
the code of the test helpers they call (followed through ``tests.*``) names a process starter
(:data:`STARTER_MODULES`, :data:`STARTER_NAMES`). ``@pytest.mark.process`` marks one by hand where the rule cannot
see (a process started deep inside our own code).

The rule is checked, not trusted: an audit hook sees every ``subprocess.Popen`` (asyncio's subprocesses and
Playwright's browser go through it) and ``os.fork``, and a test outside the ``process`` tier that starts one fails,
so a new test cannot slip into the quick tier by accident.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

#: Fixtures that start a process (conftest's broker and PostgreSQL).
PROCESS_FIXTURES = frozenset({"broker", "postgres", "pg_target"})
#: Parametrised fixtures whose given parameter starts one: (fixture, parameter).
PROCESS_PARAMS = frozenset({("store_target", "postgresql"), ("new_store", "postgresql")})
#: Modules whose use means a process: the test harness's children, and the process APIs themselves.
STARTER_MODULES = frozenset(
    {
        "tests.procs",
        "tests.stubs",
        "tests.netns_support",
        "common.children",
        "subprocess",
        "multiprocessing",
        "gateway.demo",
        "gateway.tooling.broker",
        "playwright.async_api",
        "playwright.sync_api",
    }
)
#: Names (of functions, classes or attributes) that start a process wherever they come from.
STARTER_NAMES = frozenset(
    {
        "create_subprocess_exec",
        "create_subprocess_shell",
        "Popen",
        "fork",
        "forkpty",
        "spawnv",
        "posix_spawn",
        "async_playwright",
        "sync_playwright",
        "MosquittoProcess",
        "PostgresServer",
        "portal_process",
        "run_stub",
        "start_stub",
        "shared_server",
        "new_database",
        "load_config_apart",  # gateway.daemon: forks to read the config
    }
)
#: The audit events that mean a new process.
_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "pty.spawn"})


def _is_ours(obj: Any) -> bool:
    mod = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
    return isinstance(mod, str) and (mod == "tests" or mod.startswith("tests.") or mod == "conftest")


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _codes(c)


def _starts_process(fn: Any, seen: set[int], depth: int = 0) -> bool:
    """Whether ``fn`` (or a test helper it names, followed through ``tests.*``) names a process starter."""
    fn = inspect.unwrap(fn) if callable(fn) else fn
    if id(fn) in seen or depth > 6:
        return False
    seen.add(id(fn))
    if isinstance(fn, type):
        return any(_starts_process(v, seen, depth + 1) for v in vars(fn).values() if inspect.isfunction(v))
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    spaces: list[dict[str, Any]] = [getattr(fn, "__globals__", {})]
    for c in _codes(code):
        for name in (*c.co_names, *c.co_freevars):
            if name in STARTER_NAMES:
                return True
            for ns in list(spaces):
                obj = ns.get(name)
                if obj is None:
                    continue
                if isinstance(obj, types.ModuleType):
                    if obj.__name__ in STARTER_MODULES:
                        return True
                    if _is_ours(obj):
                        spaces.append(vars(obj))
                elif getattr(obj, "__module__", None) in STARTER_MODULES or _helper_starts(obj, seen, depth):
                    return True
    return False


def _helper_starts(obj: Any, seen: set[int], depth: int) -> bool:
    ours = _is_ours(obj) and (inspect.isfunction(obj) or isinstance(obj, type))
    return ours and _starts_process(obj, seen, depth + 1)


def _is_process_test(item: pytest.Item) -> bool:
    if item.get_closest_marker("process") is not None:
        return True
    info = getattr(item, "_fixtureinfo", None)
    names = set(info.names_closure) if info is not None else set()
    if names & PROCESS_FIXTURES:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    if any(params.get(f) == p for f, p in PROCESS_PARAMS):
        return True
    seen: set[int] = set()
    funcs: list[Any] = [getattr(item, "obj", None)]
    if info is not None:
        for name in names:
            for fd in info.name2fixturedefs.get(name, ()):
                funcs.append(fd.func)
    return any(f is not None and _starts_process(f, seen) for f in funcs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "process: starts a process (found by tests/tiers.py); `make check` skips these")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _is_process_test(item) and item.get_closest_marker("process") is None:
            item.add_marker(pytest.mark.process)


_current: list[pytest.Item] = []
_started: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event in _EVENTS and _current and _current[-1].get_closest_marker("process") is None:
        what = args[1] if event == "subprocess.Popen" and len(args) > 1 else args
        _started.append(f"{event} {str(what)[:120]}")


sys.addaudithook(_audit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    _current.append(item)
    _started.clear()
    try:
        return (yield)
    finally:
        _current.pop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    result = yield
    if _started:
        pytest.fail(
            "this test started a process but is in the quick tier (tests/tiers.py did not see it coming): "
            f"{_started[:3]}; name its starter in tests/tiers.py or mark it @pytest.mark.process",
            pytrace=False,
        )
    return result
