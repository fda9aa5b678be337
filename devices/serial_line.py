"""An async serial line addressed by path or pyserial URL, read through a framer, reopened when lost.

``/dev/ttyUSB0`` in the field, a pseudo-terminal path (``/dev/pts/7``) or ``socket://127.0.0.1:5020``
in tests: the code is the same. One task per line (``<label>.read``) opens the port, waits until it
is lost and reopens it with capped exponential backoff and full jitter, reset once a connection
has lasted ``stable_after`` seconds. Bytes are handed to the framer as they arrive and each frame
to ``on_frame``, synchronously, so a reply (an ACK) can be written at once. While the port is
closed :meth:`SerialLine.write` raises :class:`SerialLineDown` at once.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

import serial
import serial_asyncio_fast

from common.backoff import backoff_delay

log = logging.getLogger(__name__)

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")


class Framer(Protocol[T_co]):
    """Turns a byte stream into frames. ``reset`` drops a partial frame (the port was reopened)."""

    def feed(self, data: bytes) -> Sequence[T_co]: ...

    def reset(self) -> None: ...


class SerialLineDown(ConnectionError):
    """The port is not open: nothing was written."""


class _LineProtocol(asyncio.Protocol):
    def __init__(self, owner: SerialLine[Any]) -> None:
        self._owner = owner
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._owner._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class SerialLine(Generic[T]):
    def __init__(
        self,
        url: str,
        framer: Framer[T],
        on_frame: Callable[[T], object],
        *,
        label: str,
        on_state: Callable[[bool, str], object] | None = None,
        baudrate: int = 9600,
        bytesize: int = 8,
        parity: str = "N",
        stopbits: float = 1,
        reconnect_min: float = 0.1,
        reconnect_max: float = 10.0,
        stable_after: float = 2.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """``on_state(open, detail)`` is called on each change: port opened, open failed, port lost."""
        if reconnect_min <= 0 or reconnect_max < reconnect_min:
            raise ValueError("need 0 < reconnect_min <= reconnect_max")
        self.url = url
        self.label = label
        self._framer = framer
        self._on_frame = on_frame
        self._on_state = on_state
        self._serial_kwargs = {"baudrate": baudrate, "bytesize": bytesize, "parity": parity, "stopbits": stopbits}
        # 7 data bits: the eighth a byte may carry is the parity bit (a line a UART did not strip, a serial server, a
        # pseudo-terminal), never data.
        self._mask = bytes(range(128)) * 2 if bytesize == 7 else None
        self._min = reconnect_min
        self._max = reconnect_max
        self._stable_after = stable_after
        self._jitter = jitter
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()
        self._state: bool | None = None
        self._counts = {"bytes_in": 0, "bytes_out": 0, "opens": 0, "open_failures": 0, "losses": 0, "frame_errors": 0}

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError(f"{self.label}: already entered")
        self._task = asyncio.create_task(self._run(), name=f"{self.label}.read")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    @property
    def is_open(self) -> bool:
        return self._transport is not None

    async def wait_open(self) -> None:
        """Wait until the port is open (bound it with ``asyncio.timeout``)."""
        await self._opened.wait()

    def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise SerialLineDown(f"{self.label}: {self.url} is not open")
        transport.write(data)
        self._counts["bytes_out"] += len(data)

    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    # ------------------------------------------------------------ internals

    def _set_state(self, is_open: bool, detail: str) -> None:
        if is_open == self._state:
            return
        self._state = is_open
        (log.info if is_open else log.warning)("%s: %s %s", self.label, self.url, detail)
        if self._on_state is not None:
            try:
                self._on_state(is_open, detail)
            except Exception:
                log.exception("%s: state callback failed", self.label)

    def _received(self, data: bytes) -> None:
        self._counts["bytes_in"] += len(data)
        if self._mask is not None:
            data = data.translate(self._mask)
        for frame in self._framer.feed(data):
            try:
                self._on_frame(frame)
            except Exception:
                self._counts["frame_errors"] += 1
                log.exception("%s: frame handler failed", self.label)

    async def _open(self) -> tuple[asyncio.Transport, _LineProtocol]:
        loop = asyncio.get_running_loop()
        transport, protocol = await serial_asyncio_fast.create_serial_connection(
            loop, lambda: _LineProtocol(self), self.url, **self._serial_kwargs
        )
        assert isinstance(protocol, _LineProtocol)
        return transport, protocol

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                transport, protocol = await self._open()
            except (serial.SerialException, OSError, ValueError) as e:
                self._counts["open_failures"] += 1
                self._set_state(False, f"cannot be opened: {e}")
                delay = backoff_delay(attempt, self._min, self._max, self._jitter)
                attempt = min(attempt + 1, 30)
                await asyncio.sleep(delay)
                continue
            self._framer.reset()
            self._transport = transport
            self._counts["opens"] += 1
            opened_at = loop.time()
            self._opened.set()
            self._set_state(True, "open")
            try:
                exc = await protocol.lost
            except asyncio.CancelledError:
                self._transport = None
                self._opened.clear()
                transport.abort()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(protocol.lost)
                raise
            self._transport = None
            self._opened.clear()
            self._counts["losses"] += 1
            self._set_state(False, f"lost: {exc or 'closed'}")
            if loop.time() - opened_at >= self._stable_after:
                attempt = 0
            delay = backoff_delay(attempt, self._min, self._max, self._jitter)
            attempt = min(attempt + 1, 30)
            await asyncio.sleep(delay)


class LineDriver(abc.ABC, Generic[T]):
    """A device driver on one :class:`SerialLine` with a supervise task beside it. An async context manager:
    enter opens the line (task ``<label>.read``) and starts ``<label>.supervise``; exit stops both and closes
    the port. ``stat_keys`` are the driver's counters, all always present in :meth:`stats`."""

    def __init__(self, line: SerialLine[T], stat_keys: Iterable[str]) -> None:
        self._line = line
        self._counts = dict.fromkeys(stat_keys, 0)
        self._supervisor: asyncio.Task[None] | None = None

    @abc.abstractmethod
    async def _supervise(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self._line.__aenter__()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"{self._line.label}.supervise")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._line.__aexit__(exc_type, exc, tb)

    async def wait_open(self) -> None:
        """Wait until the serial port is open (bound it with ``asyncio.timeout``)."""
        await self._line.wait_open()

    def stats(self) -> dict[str, int]:
        """Counters since start, with the line's ``bytes_in``, ``opens`` and ``losses``."""
        out = dict(self._counts)
        line = self._line.stats()
        for k in ("bytes_in", "opens", "losses"):
            out[k] = line[k]
        return out
