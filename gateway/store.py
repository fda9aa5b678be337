"""The gateway's local store: the event log, the outbox and engine state in one SQLite file (WAL).

One writer owns the write connection, on a thread of its own, fed by an asyncio queue: whatever is
queued when it wakes is committed in one transaction, so a burst costs one fsync, and nothing ever
blocks the event loop. An event and its outbox row (and any engine state that changed with it) are
written in the same transaction: an event is never in the log without being queued for upload.

Sequence numbers (and ids) are given when work is submitted, in submission order, which is also commit
order (one writer, a FIFO queue): they have no gaps, and an event is known by its id and seq before its commit.

The alarm path does not wait for the disk: an urgent event (priority :data:`URGENT_PRIORITY` and up) is handed
to ``on_urgent`` (the uplink) as soon as it is submitted, while its transaction is committed as usual. Before the
hand-over, it and every job submitted before it that is not yet committed are appended to a journal beside the
database (``<file>.urgent-journal``, written by a thread of its own, never synced): a crash of the process before
the commit loses nothing, because the next start commits what the journal holds that the database lacks, with
the same ids and seqs (the portal stores by id, so a copy it already has is not a second event). The journal is
emptied once everything in it is committed. A power cut can lose the journal too: a start after one (the run was
not closed cleanly and the machine's boot id changed) skips :data:`FAST_AHEAD` seqs, so no seq that may have
reached the portal is given again to another event, and records a ``store.seqs_skipped`` fault saying so. Routine
events keep group commit.
When the disk is full (or the file cannot be written), queued work waits in memory, bounded, and is
written when space returns; :attr:`Store.fault` says why meanwhile (``on_fault`` hears each change,
so the uplink can tell the portal without writing anything), and a ``store.fault`` event records the
episode once it is over.

The outbox has two lanes for the uplink: urgent events (priority :data:`URGENT_PRIORITY` and up: alarms,
tamper) and routine ones, each read in seq order (:meth:`Store.outbox_after`).

Retention: acknowledged events older than ``retention_days``, or beyond the newest ``retention_rows``, are
deleted by the writer thread in small chunks while it is idle; an event still in the outbox never is.

A file found corrupt at start-up is moved aside (``<name>.corrupt-<UTC time>``, with its -wal and -shm)
and a fresh one is made, so the gateway keeps guarding; :attr:`Store.replaced` says so, for the console.
A schema newer than this gateway knows is not corruption: it is refused, and the file left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import struct
import threading
import time
import urllib.parse
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from common import sqlite
from gateway import wire
from gateway.events import Draft

log = logging.getLogger(__name__)

#: Events at or above this priority take the uplink's urgent lane: alarms and tamper before routine traffic.
URGENT_PRIORITY = int(wire.Priority.TAMPER)
#: Pause between two retention chunks, so queued writes get the writer in between.
PRUNE_PAUSE_S = 0.05
#: A test and benchmark seam (see :func:`commit_stall`): commits that stall as an SD card's fsync can.
STALL_ENV = "GATEHOUSE_STORE_STALL"
#: Urgent events are handed to the uplink before their commit only while at most this many seqs are not yet
#: committed; a start after a power cut skips this many seqs (see the module's docstring).
FAST_AHEAD = 1000
JOURNAL_SUFFIX = ".urgent-journal"
JOURNAL_KEEP = 256 * 1024  # the journal is started over (once all of it is committed) past this size, not each time
#: The portal's acks wait this long for a commit to ride along with before they get one of their own: an ack lost
#: in a crash only means the event is sent again (the portal stores by id), so it is not worth an fsync of its own.
ACK_DELAY_S = 0.5
_RUN_KEY = "store/run"  # {"boot": boot id, "clean": closed cleanly}
_JOB_KEY = "store/job"  # the number of the last job committed (journal replay skips up to it)
_RECORD = struct.Struct(">II")  # journal record: payload length, CRC-32 of the payload

#: Each step brings the schema from version i to i+1. Never edit a released step; add one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []


def _migration(fn: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    MIGRATIONS.append(fn)
    return fn


@_migration
def _v1_event_log_and_outbox(conn: sqlite3.Connection) -> None:
    # The statements sqlite-utils wrote for this step when it was released (the same schema, word for word): the
    # daemon no longer loads sqlite-utils and its dependencies (some 6 MB resident) to make four tables.
    for sql in (
        'CREATE TABLE "events" (\n   "seq" INTEGER PRIMARY KEY,\n   "id" TEXT NOT NULL,\n   "ts" TEXT NOT NULL,\n'
        '   "type" TEXT NOT NULL,\n   "priority" INTEGER,\n   "body" BLOB NOT NULL\n)',
        'CREATE UNIQUE INDEX "idx_events_id"\n    ON "events" ("id")',
        'CREATE INDEX "idx_events_ts"\n    ON "events" ("ts")',
        'CREATE TABLE "outbox" (\n   "seq" INTEGER PRIMARY KEY REFERENCES "events"("seq")\n)',
        'CREATE TABLE "state" (\n   "key" TEXT PRIMARY KEY,\n   "value" BLOB\n)',
        'CREATE TABLE "commands_seen" (\n   "id" TEXT PRIMARY KEY,\n   "ts" TEXT\n)',
    ):
        conn.execute(sql)


class StoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class CorruptReplaced:
    """A corrupt database file was moved aside (to ``moved_to``) and a fresh one will be made at ``path``."""

    path: Path
    moved_to: Path
    error: str


_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_SIDECARS = ("-wal", "-shm")


def is_corrupt_error(e: BaseException) -> bool:
    """True for SQLite's "malformed" and "not a database" errors; not for locks, I/O errors or a full disk."""
    code = getattr(e, "sqlite_errorcode", None)
    return isinstance(e, sqlite3.DatabaseError) and code is not None and (code & 0xFF) in _CORRUPT_CODES


def corruption(path: Path) -> str | None:
    """Why the SQLite file at ``path`` is corrupt (open, then ``PRAGMA quick_check``), or None if it reads
    well or does not exist. Other errors (locked, unreadable) are raised: they are no reason to move it."""
    if not path.exists():
        return None
    try:
        # Read-only: a writable connection would delete (or checkpoint) the -wal and -shm on close,
        # and they belong with the file, for whoever looks into what went wrong.
        conn = sqlite3.connect(
            f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro", uri=True, isolation_level=None, timeout=10
        )
        try:
            rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(20)").fetchall()]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        if is_corrupt_error(e):
            return str(e)
        raise
    return None if rows == ["ok"] else "quick_check: " + "; ".join(rows)


def move_aside(path: Path, error: str, now: datetime) -> CorruptReplaced:
    """Rename ``path`` (sidecars first, so a stale WAL never meets a fresh file) to ``<name>.corrupt-<UTC time>``."""
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = f"{path.name}.corrupt-{stamp}"
    target = path.with_name(base)
    for n in range(1, 1000):
        if not any(Path(f"{target}{s}").exists() for s in ("", *_SIDECARS)):
            break
        target = path.with_name(f"{base}.{n}")
    else:
        raise StoreError(f"{path}: no free name to move the corrupt file to")
    for s in (*_SIDECARS, ""):
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{path}{s}", f"{target}{s}")
    log.error("database %s is corrupt (%s): moved to %s; starting a fresh one", path, error, target)
    return CorruptReplaced(path=path, moved_to=target, error=error)


def replace_if_corrupt(path: Path, now: Callable[[], datetime] = wire.utcnow) -> CorruptReplaced | None:
    """Check the file before it is opened for use; move it aside if corrupt (the next open makes a fresh one)."""
    error = corruption(path)
    return None if error is None else move_aside(path, error, now())


def commit_stall(spec: str | None) -> Callable[[], float] | None:
    """How long each commit stalls, from ``GATEHOUSE_STORE_STALL`` (tests and benchmarks; unset in production):
    ``SECONDS`` stalls every commit, ``SECONDS:PATH`` only while PATH exists. The stall is a sleep in the writer
    thread inside the transaction, just before COMMIT, where a slow card's fsync would hold it: the database,
    its lock and its thread are the real ones, only time is made to pass."""
    if not spec:
        return None
    secs, _, path = spec.partition(":")
    try:
        seconds = float(secs)
    except ValueError:
        raise ValueError(f"{STALL_ENV}={spec!r}: expected SECONDS or SECONDS:PATH") from None
    if not 0 <= seconds <= 600:
        raise ValueError(f"{STALL_ENV}={spec!r}: SECONDS must be 0-600")
    if path:
        flag = Path(path)
        return lambda: seconds if flag.exists() else 0.0
    return lambda: seconds


@dataclass
class _Job:
    """One transaction's worth of work. ``rows`` are the events, built (id, seq, body) at submission."""

    rows: list[tuple[int, str, str, str, int, bytes]] = field(default_factory=list)
    events: list[wire.Event] = field(default_factory=list)
    state: dict[str, Any] | None = None
    future: asyncio.Future[list[wire.Event]] | None = None
    number: int = 0  # submission order of drafts and state (0: an ack)
    journaled: bool = False
    created: float = field(default_factory=time.monotonic)


def boot_id() -> str:
    """The kernel's id of this boot ("" where there is none): a crash of the process keeps it, a power cut not."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The jobs in an urgent journal, in order, up to the first record that is torn or damaged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    jobs: list[dict[str, Any]] = []
    pos = 0
    while pos + _RECORD.size <= len(data):
        size, crc = _RECORD.unpack_from(data, pos)
        payload = data[pos + _RECORD.size : pos + _RECORD.size + size]
        if len(payload) < size or zlib.crc32(payload) != crc:
            log.warning("urgent journal %s: a torn record at byte %d; the rest is ignored", path, pos)
            break
        try:
            jobs.extend(msgspec.msgpack.decode(payload))
        except msgspec.DecodeError:
            log.warning("urgent journal %s: an unreadable record at byte %d; the rest is ignored", path, pos)
            break
        pos += _RECORD.size + size
    return jobs


_enc = msgspec.json.Encoder()
R = TypeVar("R")


def open_db(path: Path) -> sqlite3.Connection:
    """Open (creating and migrating) the store file. The connection belongs to the calling thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite.connect(path, synchronous="FULL", foreign_keys=True, busy_timeout_ms=10_000, timeout=10)
    try:
        sqlite.migrate(conn, MIGRATIONS, name=f"store {path}")
    except sqlite.SchemaTooNew as e:
        conn.close()
        raise StoreError(str(e)) from None
    except BaseException:
        conn.close()
        raise
    return conn


class Store:
    """Async facade over the store file. Use as ``async with Store(...) as store:``."""

    def __init__(
        self,
        path: Path,
        *,
        site: str,
        gateway: str,
        batch_max: int = 500,
        ring_max: int = 100_000,
        wall: Callable[[], datetime] = wire.utcnow,
        retention_days: float | None = None,
        retention_rows: int | None = None,
        prune_chunk: int = 500,
        prune_every_s: float = 600.0,
        stall: Callable[[], float] | None = None,
    ) -> None:
        self.path = Path(path)
        self.site = site
        self.gateway = gateway
        self.batch_max = batch_max
        self.ring_max = ring_max
        self._wall = wall
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._pending = 0  # drafts queued or in the ring, not yet committed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-reader")
        self._local = threading.local()
        self._writer_task: asyncio.Task[None] | None = None
        self._next_seq = 1
        self.fault: str | None = None
        self.on_commit: Callable[[], None] | None = None  # told after each commit that added events (the uplink)
        self.last_seq = 0
        self.on_fault: Callable[[str | None], None] | None = None
        self.dropped = 0
        self.replaced: CorruptReplaced | None = None  # set at open when a corrupt file was moved aside
        self.last_urgent_seq = 0  # newest seq ever committed to the urgent lane (the uplink skips an empty lane)
        self.last_unhanded_seq = 0  # newest urgent seq committed that was not handed over before its commit
        self.last_routine_seq = 0  # newest routine seq committed (the uplink skips an empty lane)
        self._handed: set[int] = set()  # urgent seqs handed over, not yet committed
        self._fault_since: datetime | None = None
        self._fault_first = ""
        self._fault_peak = 0
        self.retention_days = retention_days
        self.retention_rows = retention_rows
        self.prune_chunk = prune_chunk
        self.prune_every_s = prune_every_s
        self._prune_due = time.monotonic() + min(prune_every_s, 60.0)  # not in the way of start-up
        self._prune_logged = False
        self.pruned = 0  # events deleted by retention since start
        self._stall = stall
        #: Called on the loop with the (seq, encoded event) of urgent events as soon as they are journaled; True if
        #: it sent them (they are then not read from the outbox again unless they must be re-sent).
        self.on_urgent: Callable[[list[tuple[int, bytes]]], bool] | None = None
        self.committed_seq = 0  # newest seq committed
        self.fast_sent = 0  # urgent events handed over before their commit
        self._job_no = 0
        self._unwritten: deque[_Job] = deque()  # jobs with drafts or state, not yet committed, in order
        self._journal_path = self.path.with_name(self.path.name + JOURNAL_SUFFIX)
        self._journal = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-journal")
        self._journal_fd: int | None = None
        self._journal_last = 0  # the last job number appended (journal thread)
        self._journal_logged = False
        self._boot = boot_id()
        self._skipped: tuple[int, int] | None = None
        self._acks: set[int] = set()  # acknowledged seqs whose outbox rows are not deleted yet (none is read again)
        self._acks_committing: set[int] = set()  # taken along by the commit under way
        self._ack_timer: asyncio.TimerHandle | None = None
        self._writing = False  # a commit is under way (the acks wait for it, or for the one queued after it)
        self._journal_size = 0  # bytes in the journal (journal thread)

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Store:
        loop = asyncio.get_running_loop()
        self._next_seq, self.last_urgent_seq = await loop.run_in_executor(self._executor, self._open_writer)
        self.last_seq = self.committed_seq = self.last_routine_seq = self._next_seq - 1
        self.last_unhanded_seq = self.last_urgent_seq
        await loop.run_in_executor(self._journal, self._journal_open)
        self._writer_task = asyncio.create_task(self._writer(), name=f"gateway[{self.gateway}].store.writer")
        if self._skipped is not None:
            lo, hi = self._skipped
            self.submit(
                [
                    Draft(
                        type="store.seqs_skipped",
                        device="gateway",
                        place=wire.Place(site=self.site),
                        priority=wire.Priority.FAULT,
                        data={
                            "from": lo,
                            "to": hi,
                            "detail": "the previous run ended without closing the "
                            "store and the machine restarted since (a power cut?): seqs that alarms may "
                            "have carried to the portal before their commit are not given again",
                        },
                    )
                ]
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Drain what is queued (a few seconds at most), then close the connections. The run is marked clean only
        when everything was committed."""
        if self._writer_task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.drain(), timeout=5.0)
            if not self._unwritten and not self.fault:
                self._queue.put_nowait(_Job(state={_RUN_KEY: {"boot": self._boot, "clean": True}}))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.drain(), timeout=2.0)
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        if self._ack_timer is not None:  # the drain committed what it could take
            self._ack_timer.cancel()
            self._ack_timer = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_conn)
        await loop.run_in_executor(self._reader, self._close_conn)
        await loop.run_in_executor(self._journal, self._journal_close)
        self._executor.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self._journal.shutdown(wait=True)

    async def drain(self) -> None:
        """Wait until everything queued so far is committed, acks included (callers bound it: a full disk makes it
        wait)."""
        if self._acks:
            self._queue.put_nowait(_Job())
        await self._queue.join()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = open_db(self.path)
        return conn

    def _close_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _open_writer(self) -> tuple[int, int]:
        """(next seq, newest urgent seq in the outbox)."""
        self.replaced = replace_if_corrupt(self.path, self._wall)
        try:
            row = self._conn().execute("SELECT max(seq) FROM events").fetchone()
        except sqlite3.DatabaseError as e:
            # Damage quick_check did not see (it skips some checks): the same remedy, once.
            if self.replaced is not None or not is_corrupt_error(e):
                raise
            self._close_conn()
            self.replaced = move_aside(self.path, str(e), self._wall())
            row = self._conn().execute("SELECT max(seq) FROM events").fetchone()
        conn = self._conn()
        next_seq = self._replay_journal(conn, int(row[0] or 0)) + 1
        urgent = conn.execute(
            "SELECT max(o.seq) FROM outbox o JOIN events e ON e.seq = o.seq WHERE e.priority >= ?", (URGENT_PRIORITY,)
        ).fetchone()
        return next_seq, int(urgent[0] or 0)

    def _state_value(self, conn: sqlite3.Connection, key: str) -> Any:
        row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return msgspec.json.decode(row[0]) if row else None

    def _replay_journal(self, conn: sqlite3.Connection, max_seq: int) -> int:
        """Commit what the urgent journal holds that the database lacks (a crash between hand-over and commit),
        mark this run as running, skip seqs after a power cut. Returns the highest seq now taken."""
        done = int(self._state_value(conn, _JOB_KEY) or 0)
        run = self._state_value(conn, _RUN_KEY)
        jobs = [j for j in read_journal(self._journal_path) if int(j["n"]) > done]
        conn.execute("BEGIN IMMEDIATE")
        try:
            for j in jobs:
                rows = [tuple(r) for r in j["rows"]]
                conn.executemany("INSERT INTO events(seq, id, ts, type, priority, body) VALUES (?,?,?,?,?,?)", rows)
                conn.executemany("INSERT INTO outbox(seq) VALUES (?)", [(r[0],) for r in rows])
                self._apply_state(conn, [j["state"] or {}])
                done = int(j["n"])
                max_seq = max([max_seq] + [int(r[0]) for r in rows])
            if isinstance(run, dict) and not run.get("clean") and run.get("boot") != self._boot:
                self._skipped = (max_seq + 1, max_seq + FAST_AHEAD)
                max_seq += FAST_AHEAD
                log.warning(
                    "store %s: the last run did not close the store and the machine has restarted since: "
                    "seqs %d-%d are skipped",
                    self.path,
                    *self._skipped,
                )
            conn.executemany(
                "INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)",
                [(_JOB_KEY, _enc.encode(done)), (_RUN_KEY, _enc.encode({"boot": self._boot, "clean": False}))],
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if jobs:
            log.warning(
                "store %s: %d jobs committed from the urgent journal (the last run stopped before their commit)",
                self.path,
                len(jobs),
            )
        self._job_no = done
        return max_seq

    @staticmethod
    def _apply_state(conn: sqlite3.Connection, states: Iterable[dict[str, Any]]) -> None:
        """State changes in order: a value sets its key, None deletes it, ``"prefix/*": None`` every key under it."""
        final: dict[str, bytes | None] = {}
        prefixes: list[str] = []
        for st in states:
            for k, v in st.items():
                if k.endswith("/*") and v is None:
                    p = k[:-1]
                    prefixes.append(p)
                    for old in [o for o in final if o.startswith(p)]:
                        del final[old]
                else:
                    final[k] = None if v is None else _enc.encode(v)
        for p in prefixes:
            conn.execute("DELETE FROM state WHERE substr(key, 1, ?) = ?", (len(p), p))
        gone = [(k,) for k, v in final.items() if v is None]
        if gone:
            conn.executemany("DELETE FROM state WHERE key = ?", gone)
        kept = [(k, v) for k, v in final.items() if v is not None]
        if kept:
            conn.executemany("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", kept)

    # ------------------------------------------------------------ the urgent journal (its own thread)

    def _journal_open(self) -> None:
        self._journal_fd = os.open(self._journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self._journal_last = self._journal_size = 0

    def _journal_close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def _journal_append(self, record: bytes, last_job: int) -> None:
        assert self._journal_fd is not None
        n = os.write(self._journal_fd, record)
        self._journal_size += n
        if n != len(record):
            raise OSError(f"short write to {self._journal_path} ({n} of {len(record)} bytes)")
        self._journal_last = last_job

    def _journal_empty(self, committed_job: int) -> None:
        """Everything journaled is committed: start the journal over, once it is worth a truncation (a start skips
        the jobs it finds committed anyway)."""
        if (
            self._journal_fd is not None
            and self._journal_last
            and self._journal_last <= committed_job
            and self._journal_size > JOURNAL_KEEP
        ):
            os.ftruncate(self._journal_fd, 0)
            self._journal_last = self._journal_size = 0

    # ------------------------------------------------------------ writes

    def submit(self, drafts: Sequence[Draft], state: dict[str, Any] | None = None) -> asyncio.Future[list[wire.Event]]:
        """Queue drafts (and state changes) for one transaction; the future gives the stored events.

        Never blocks and never fails for lack of disk: the work waits in memory until it can be written.
        Past ``ring_max`` queued drafts, new work of routine events only is refused (counted in ``dropped``);
        work that carries anything above ROUTINE (an alarm, a tamper, a fault) is always taken.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[wire.Event]] = loop.create_future()
        if self._pending + len(drafts) > self.ring_max and not any(d.priority > wire.Priority.ROUTINE for d in drafts):
            self.dropped += len(drafts)
            fut.set_exception(StoreError("store backlog full"))
            fut.exception()  # counted in ``dropped`` and recorded in the fault episode: no traceback per refusal
            return fut
        self._pending += len(drafts)
        self._job_no += 1
        job = _Job(state=state, future=fut, number=self._job_no)
        urgent: list[tuple[int, bytes]] = []
        for d in drafts:
            ts = d.ts or self._wall()
            seq = self._next_seq
            self._next_seq += 1
            ev = wire.Event(
                id=wire.new_id(ts),
                seq=seq,
                ts=ts,
                type=d.type,
                device=d.device,
                place=d.place,
                point=d.point,
                priority=int(d.priority),
                data=d.data,
            )
            body = wire.encode(ev)  # framed into batches as it is: wire.encode_framed
            job.rows.append((seq, ev.id, ts.isoformat(), ev.type, ev.priority, body))
            job.events.append(ev)
            if ev.priority >= URGENT_PRIORITY:
                urgent.append((seq, body))
        self._unwritten.append(job)
        self._queue.put_nowait(job)
        if (
            urgent
            and self.on_urgent is not None
            and self._next_seq - 1 - self.committed_seq <= FAST_AHEAD
            and self._journal_fd is not None
        ):
            self._hand_over(loop, urgent)
        return fut

    def _hand_over(self, loop: asyncio.AbstractEventLoop, urgent: list[tuple[int, bytes]]) -> None:
        """Journal every uncommitted job not journaled yet (this one last), then give the urgent events to the
        uplink: neither waits for a commit."""
        jobs = [j for j in self._unwritten if not j.journaled]
        for j in jobs:
            j.journaled = True
        payload = msgspec.msgpack.encode([{"n": j.number, "rows": j.rows, "state": j.state} for j in jobs])
        record = _RECORD.pack(len(payload), zlib.crc32(payload)) + payload
        done = loop.run_in_executor(self._journal, self._journal_append, record, jobs[-1].number)

        def handed(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                if not self._journal_logged:
                    self._journal_logged = True
                    log.error(
                        "store %s: urgent journal not written (%s): alarms wait for their commit",
                        self.path,
                        None if f.cancelled() else f.exception(),
                    )
                return
            if self.on_urgent is not None and self.on_urgent(urgent):
                self.fast_sent += len(urgent)
                self._handed.update(seq for seq, _ in urgent if seq > self.committed_seq)

        done.add_done_callback(handed)

    async def append(self, drafts: Sequence[Draft], state: dict[str, Any] | None = None) -> list[wire.Event]:
        return await self.submit(drafts, state)

    def acknowledge(self, seqs: Iterable[int]) -> None:
        """The portal has stored these: forget them from the outbox (the event log keeps them), in the next commit or
        within :data:`ACK_DELAY_S` of the writer going idle; never before the event's own commit. No timer runs while
        a commit is under way or queued: an alarm's ack rides the commit of the alarms after it, and costs no wake-up
        of its own."""
        seqs = list(seqs)
        if not seqs:
            return
        self._acks.update(seqs)
        if not self._writing and self._queue.empty():
            self._arm_acks()  # a commit under way or queued takes them along (or arms this after it)

    def _arm_acks(self) -> None:
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._acks_due)

    def _acks_due(self) -> None:
        self._ack_timer = None
        if self._acks:
            self._queue.put_nowait(_Job())  # wakes the writer, which takes the acks along

    def _take_acks(self, jobs: list[_Job]) -> list[int]:
        """The pending acks whose events are committed or in this batch (the rest wait for theirs)."""
        upto = max([self.committed_seq] + [j.rows[-1][0] for j in jobs if j.rows])
        take = [s for s in self._acks if s <= upto]
        self._acks.difference_update(take)
        self._acks_committing = set(take)
        if not self._acks and self._ack_timer is not None:
            self._ack_timer.cancel()  # all of them ride this commit
            self._ack_timer = None
        return take

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while True:
            jobs = [await self._next_job()]
            n = len(jobs[0].rows)
            while not self._queue.empty() and n < self.batch_max:
                job = self._queue.get_nowait()
                jobs.append(job)
                n += len(job.rows)
            acks = self._take_acks(jobs)
            self._writing = True
            while True:
                try:
                    results = await loop.run_in_executor(self._executor, self._commit, jobs, acks)
                    break
                except (sqlite3.OperationalError, sqlite3.DatabaseError, OSError) as e:
                    # Disk full, read-only file, I/O error: keep the jobs, say so, try again later.
                    self._set_fault(f"storage: {e}")
                    self._fault_peak = max(self._fault_peak, self._pending)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            backoff = 0.05
            self._writing = False
            self._acks_committing = set()
            if self._acks and self._queue.empty():
                self._arm_acks()  # left over (their events were not committed yet), and no commit queued to take them
            self._set_fault(None)
            added = False
            journaled = 0
            for job, events in zip(jobs, results, strict=True):
                self._pending -= len(job.rows)
                added = added or bool(events)
                if job.number:
                    self._unwritten.popleft()
                    journaled = job.number if job.journaled else journaled
                if job.future is not None and not job.future.done():
                    job.future.set_result(events)
                self._queue.task_done()
            # The size is the journal thread's, read here a moment late at worst: that only puts the truncation off
            # to a later commit, and spares every other commit a trip to that thread.
            if journaled and self._journal_size > JOURNAL_KEEP and not any(j.journaled for j in self._unwritten):
                loop.run_in_executor(self._journal, self._journal_empty, journaled)
            if added and self.on_commit is not None:
                self.on_commit()

    async def _next_job(self) -> _Job:
        """The next queued job. While the queue is idle, prune the event log when due, a chunk at a time."""
        loop = asyncio.get_running_loop()
        while self.retention_days is not None or self.retention_rows is not None:
            now = time.monotonic()
            if not self._queue.empty() or self.fault:
                break
            if now < self._prune_due:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._prune_due - now):
                        return await self._queue.get()
                continue
            try:
                n = await loop.run_in_executor(self._executor, self._prune_chunk)
            except (sqlite3.Error, OSError) as e:
                if not self._prune_logged:
                    self._prune_logged = True
                    log.warning(
                        "store %s: retention failed: %s (retried every %.0f s)", self.path, e, self.prune_every_s
                    )
                n = 0
            self._prune_due = time.monotonic() + (PRUNE_PAUSE_S if n >= self.prune_chunk else self.prune_every_s)
        return await self._queue.get()

    def _set_fault(self, fault: str | None) -> None:
        if fault != self.fault:
            if fault:
                log.error("store %s: %s; %d drafts wait in memory", self.path, fault, self._pending)
                if self._fault_since is None:
                    self._fault_since, self._fault_first, self._fault_peak = self._wall(), fault, self._pending
            else:
                log.warning("store %s: writable again", self.path)
                self._record_fault_episode()
            self.fault = fault
            if self.on_fault is not None:
                self.on_fault(fault)

    def _record_fault_episode(self) -> None:
        """Once writable again, put the episode in the event log (it could not be written while it lasted)."""
        if self._fault_since is None:
            return
        until = self._wall()
        d = Draft(
            type="store.fault",
            device="gateway",
            place=wire.Place(site=self.site),
            priority=wire.Priority.FAULT,
            data={
                "detail": self._fault_first[:300],
                "since": self._fault_since.isoformat(),
                "until": until.isoformat(),
                "waited": self._fault_peak,
                "dropped": self.dropped,
            },
        )
        self._fault_since = None
        self.submit([d])

    def _commit(self, jobs: list[_Job], ack_seqs: Sequence[int] = ()) -> list[list[wire.Event]]:
        conn = self._conn()
        rows = [r for job in jobs for r in job.rows]
        acks = [(s,) for s in ack_seqs]
        states = [job.state for job in jobs if job.state]
        last_job = max((job.number for job in jobs), default=0)
        if last_job:
            states.append({_JOB_KEY: last_job})
        conn.execute("BEGIN IMMEDIATE")
        try:
            if rows:
                conn.executemany("INSERT INTO events(seq, id, ts, type, priority, body) VALUES (?,?,?,?,?,?)", rows)
                conn.executemany("INSERT INTO outbox(seq) VALUES (?)", [(r[0],) for r in rows])
            if acks:
                conn.executemany("DELETE FROM outbox WHERE seq = ?", acks)
            if states:
                self._apply_state(conn, states)
            if self._stall is not None and (stall_s := self._stall()) > 0:
                time.sleep(stall_s)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if rows:
            for r in rows:
                if r[4] < URGENT_PRIORITY:
                    self.last_routine_seq = r[0]
                else:
                    self.last_urgent_seq = r[0]
                    if r[0] in self._handed:
                        self._handed.discard(r[0])
                    else:
                        self.last_unhanded_seq = r[0]
            self.last_seq = self.committed_seq = max(self.committed_seq, rows[-1][0])
        return [job.events for job in jobs]

    def _prune_chunk(self) -> int:
        """Delete up to ``prune_chunk`` of the oldest acknowledged events past retention (writer thread)."""
        conn = self._conn()
        conds: list[str] = []
        args: list[Any] = []
        bound = 0  # no seq above this qualifies: keeps the scan short when there is nothing to delete
        cutoff = None
        if self.retention_rows is not None:
            bound = max(bound, self.last_seq - self.retention_rows)
            conds.append("seq <= ?")
            args.append(self.last_seq - self.retention_rows)
        if self.retention_days is not None:
            cutoff = (self._wall() - timedelta(days=self.retention_days)).astimezone(UTC).isoformat()
            row = conn.execute("SELECT seq FROM events WHERE ts < ? ORDER BY ts DESC LIMIT 1", (cutoff,)).fetchone()
            if row is not None:
                bound = max(bound, int(row[0]))
            conds.append("ts < ?")
            args.append(cutoff)
        # The newest event always stays: the next seq is counted from it after a restart.
        bound = min(bound, self.last_seq - 1)
        if bound <= 0 and cutoff is None:
            return 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            n = 0
            if bound > 0:
                n = conn.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events e WHERE e.seq <= ? AND ("
                    + " OR ".join(conds)
                    + ") AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.seq = e.seq)"
                    " ORDER BY e.seq LIMIT ?)",
                    (bound, *args, self.prune_chunk),
                ).rowcount
            if cutoff is not None:  # command ids are only needed while a re-delivery could still come
                conn.execute(
                    "DELETE FROM commands_seen WHERE id IN (SELECT id FROM commands_seen WHERE ts < ? LIMIT ?)",
                    (cutoff, self.prune_chunk),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.pruned += n
        if n:
            log.debug("store %s: retention deleted %d events", self.path, n)
        return n

    async def prune_now(self) -> int:
        """Run retention to the end now (chunk by chunk, on the writer thread); the events deleted."""
        loop = asyncio.get_running_loop()
        total = 0
        while True:
            n = await loop.run_in_executor(self._executor, self._prune_chunk)
            total += n
            if n < self.prune_chunk:
                return total

    # ------------------------------------------------------------ reads (a second connection, WAL readers)

    async def _read(self, fn: Callable[[sqlite3.Connection], R]) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._reader, lambda: fn(self._conn()))

    async def outbox_after(
        self, after_seq: int, limit: int, *, lane: Literal["all", "urgent", "routine"] = "all", upto: int | None = None
    ) -> list[tuple[int, bytes]]:
        """(seq, encoded event) of outbox rows past ``after_seq`` (and not past ``upto``), in seq order: all of
        them, or only one lane (urgent: priority >= :data:`URGENT_PRIORITY`)."""
        sql = "SELECT o.seq, e.body FROM outbox o JOIN events e ON e.seq = o.seq WHERE o.seq > ?"
        tail: list[int] = []
        if upto is not None:
            sql += " AND o.seq <= ?"
            tail.append(upto)
        if lane != "all":
            sql += " AND e.priority >= ?" if lane == "urgent" else " AND e.priority < ?"
            tail.append(URGENT_PRIORITY)
        sql += " ORDER BY o.seq LIMIT ?"
        while True:
            args = [after_seq, *tail, limit]

            def page(c: sqlite3.Connection, q: str = sql, a: list[Any] = args) -> list[tuple[int, bytes]]:
                return c.execute(q, a).fetchall()

            rows = await self._read(page)
            gone = self._acks | self._acks_committing  # acknowledged already, their deletes not committed yet
            if not gone or not rows:
                return rows
            fresh = [r for r in rows if r[0] not in gone]
            if fresh or len(rows) < limit:
                return fresh
            after_seq = rows[-1][0]  # a whole page of acknowledged rows: look past it

    async def event_count(self) -> int:
        return int((await self._read(lambda c: c.execute("SELECT count(*) FROM events").fetchone()))[0])

    async def outbox_depth(self) -> int:
        return int((await self._read(lambda c: c.execute("SELECT count(*) FROM outbox").fetchone()))[0])

    async def get_state(self, key: str) -> Any:
        row = await self._read(lambda c: c.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone())
        return msgspec.json.decode(row[0]) if row else None

    async def get_states(self, prefix: str) -> dict[str, Any]:
        """Every state row under ``prefix`` (``alarm_engine/``), by the rest of its key."""
        rows = await self._read(
            lambda c: c.execute(
                "SELECT key, value FROM state WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
            ).fetchall()
        )
        return {k[len(prefix) :]: msgspec.json.decode(v) for k, v in rows}

    async def events(self, after_seq: int = 0, limit: int = 1000) -> list[wire.Event]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            ).fetchall()
        )
        dec = msgspec.json.Decoder(wire.Event)
        return [dec.decode(r[0]) for r in rows]

    async def seen_command(self, command_id: str, ts: datetime) -> bool:
        """Record a command id; True if it was already recorded (a re-delivery, not to be run again)."""

        def q(c: sqlite3.Connection) -> bool:
            cur = c.execute("INSERT OR IGNORE INTO commands_seen(id, ts) VALUES (?, ?)", (command_id, ts.isoformat()))
            return cur.rowcount == 0

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: q(self._conn()))
        except (sqlite3.OperationalError, OSError) as e:
            # A full disk must not stop a remote unlock: run it, without the guard against a re-delivery.
            log.error("store %s: command %s not recorded (%s); carried out unrecorded", self.path, command_id, e)
            return False

    @property
    def pending(self) -> int:
        return self._pending
