"""common.children against real child processes: a child that dies before its ready line, one that never says it,
one that ignores SIGTERM, and one that behaves."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from common import children

pytestmark = pytest.mark.timeout(60)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_a_ready_child_answers_its_ready_line_and_passes_other_lines_on(tmp_path: Path) -> None:
    seen: list[str] = []
    proc = await children.spawn(
        py("import sys, time; print('warming up'); print('{\"ready\": true, \"port\": 5}'); time.sleep(30)"),
        log=tmp_path / "c.log",
    )
    assert await children.wait_ready(proc, "c", 20, on_line=seen.append) == {"ready": True, "port": 5}
    assert seen == ["warming up"]
    assert await children.stop(proc, "c") == -signal.SIGTERM


async def test_a_child_that_dies_first_is_not_ready_and_its_log_is_named(tmp_path: Path) -> None:
    log = tmp_path / "dies.log"
    proc = await children.spawn(py("import sys; sys.stderr.write('bad config\\n'); sys.exit(2)"), log=log)
    with pytest.raises(children.NotReady, match=re.escape(f"dies exited before it was ready; see {log}")):
        await children.wait_ready(proc, "dies", 20, log=log)
    # It has ended (wait_ready waited for it). Its status is asyncio's to tell: twice in some twenty full runs
    # (pids wrapped, three workers) asyncio's child watcher found the pid already reaped by someone else in the
    # process ("Unknown child process pid", 255), which this test does not judge.
    assert proc.returncode is not None
    assert log.read_text() == "bad config\n"


async def test_a_silent_child_is_killed_when_its_time_is_up(tmp_path: Path) -> None:
    proc = await children.spawn(py("import time; time.sleep(60)"), log=tmp_path / "s.log")
    t0 = time.monotonic()
    with pytest.raises(children.NotReady, match=re.escape("silent not ready within 0.5 s")):
        await children.wait_ready(proc, "silent", 0.5)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == -signal.SIGKILL  # not left running behind the error


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc = await children.spawn(
        py(
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('{\"ready\": true}', "
            "flush=True); time.sleep(60)"
        ),
        log=tmp_path / "stubborn.log",
    )
    await children.wait_ready(proc, "stubborn", 20)
    t0 = time.monotonic()
    assert await children.stop(proc, "stubborn", grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 10
    assert "stubborn did not stop within 0.5 s; killing it" in caplog.text


async def test_stopping_a_child_that_already_exited_answers_its_code(tmp_path: Path) -> None:
    proc = await children.spawn(py("raise SystemExit(3)"), stdout=asyncio.subprocess.DEVNULL)
    await proc.wait()
    assert await children.stop(proc) == 3
