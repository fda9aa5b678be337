"""A clean stop while the broker stops at the same moment (a power-down of the plant room, a `systemctl stop` of
both): the gateway exits 0 and logs no ERROR, in particular no "Task exception was never retrieved" from an uplink
task that failed as it was being cancelled."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path

import pytest

from common import tasks
from gateway.tooling.broker import MosquittoProcess
from tests import procs

pytestmark = pytest.mark.timeout(180)


def test_gateway_and_broker_stopped_together_stop_cleanly(tmp_path: Path) -> None:
    # The stops race; each round lands them differently: the broker first (lag > 0: the gateway that much later),
    # or the gateway first (lag < 0), when its uplink is saying "offline" or being cancelled.
    for i, lag in enumerate((0.0, 0.005, 0.02, -0.002, -0.005, -0.01, -0.02, -0.03, -0.06, -0.1)):
        broker = MosquittoProcess(tmp_path / f"broker{i}").start()
        folder = tmp_path / f"gw{i}"
        folder.mkdir()
        (folder / "gateway.yaml").write_text(
            f"site: s1\ngateway: gw1\ndata_dir: data\nlog_level: DEBUG\nlocal_api: {{enabled: false}}\n"
            f"mqtt: {{host: 127.0.0.1, port: {broker.port}, reconnect_min_s: 0.1, reconnect_max_s: 0.5}}\n"
            "loadgen: {count: 100000, rate: 200}\n",
            encoding="utf-8",
        )  # traffic on the link as it goes
        gw = procs.gateway(folder / "gateway.yaml", tmp_path / "logs", name=f"gateway-{i}").start()
        try:
            procs.wait(lambda g=gw: "uplink connected" in g.tail(100_000), 10, "the uplink connected")
            assert gw.proc is not None and broker.proc is not None
            first, second = (broker.proc, gw.proc) if lag >= 0 else (gw.proc, broker.proc)
            t = threading.Timer(abs(lag), second.send_signal, args=(signal.SIGTERM,))
            t.start()
            first.send_signal(signal.SIGTERM)
            t.join()
            code = gw.proc.wait(20)
        finally:
            gw.stop()
            broker.stop()
        log = gw.log_path.read_text(errors="replace")
        assert code == 0, log[-3000:]
        assert "never retrieved" not in log and " ERROR " not in log and "Traceback" not in log, log[-3000:]
        assert "gateway stopped" in log


async def test_a_task_that_fails_as_its_group_is_cancelled_has_its_error_retrieved() -> None:
    """The unit of it: one of the tasks serving a connection fails in the same loop turn as the caller is
    cancelled; its exception must be taken (and not left for the garbage collector to report)."""
    unretrieved: list[object] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx.get("message")))
    try:

        async def fails() -> None:
            await asyncio.sleep(0)
            raise ConnectionError("broker gone")

        async def serves() -> None:
            await asyncio.sleep(60)

        failing = asyncio.create_task(fails(), name="receive")
        serving = asyncio.create_task(serves(), name="send")
        runner = asyncio.create_task(tasks.run_until_first_ends("uplink", [failing, serving]))
        await asyncio.sleep(0)  # the runner waits; the failing task fails in the next turn
        runner.cancel()  # ... which is the turn the cancel lands
        with pytest.raises(asyncio.CancelledError):
            await runner
        assert failing.done() and serving.cancelled()
        del failing, serving, runner
        import gc

        gc.collect()
        await asyncio.sleep(0)
        assert unretrieved == []
    finally:
        loop.set_exception_handler(None)


def test_the_loop_handler_quiets_only_aiomqtts_deferred_watch_of_a_closed_socket(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import errno
    import logging

    from gateway.app import _loop_exception

    loop = asyncio.new_event_loop()
    try:
        race = asyncio.Handle(loop.add_writer, (12, print), loop)
        other = asyncio.Handle(print, (), loop)
        with caplog.at_level(logging.DEBUG):
            _loop_exception(
                loop,
                {
                    "message": "Exception in callback",
                    "handle": race,
                    "exception": OSError(errno.EBADF, "Bad file descriptor"),
                },
            )
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
            _loop_exception(
                loop,
                {
                    "message": "Exception in callback",
                    "handle": other,
                    "exception": OSError(errno.EBADF, "Bad file descriptor"),
                },
            )
            _loop_exception(
                loop,
                {"message": "Exception in callback", "handle": race, "exception": OSError(errno.EPIPE, "Broken pipe")},
            )
        assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 2  # anything else is an ERROR
    finally:
        loop.close()
