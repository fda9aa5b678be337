"""The gateway's local store: the event log, the outbox and engine state in one SQLite file (WAL).

One writer owns the write connection, on a thread of its own, fed by an asyncio queue: whatever is
queued when it wakes is committed in one transaction, so a burst costs one fsync, and nothing ever
blocks the event loop. An event and its outbox row (and any engine state that changed with it) are
written in the same transaction: an event is never in the log without being queued for upload.

Sequence numbers are given at commit, inside the transaction, so they have no gaps.
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
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import sqlite_utils
from ulid import ULID

from gateway import wire
from gateway.events import Draft

log = logging.getLogger(__name__)

#: Events at or above this priority take the uplink's urgent lane: alarms and tamper before routine traffic.
URGENT_PRIORITY = int(wire.Priority.TAMPER)
#: Pause between two retention chunks, so queued writes get the writer in between.
PRUNE_PAUSE_S = 0.05

#: Each step brings the schema from version i to i+1. Never edit a released step; add one.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


def _migration(fn: Callable[[sqlite_utils.Database], None]) -> Callable[[sqlite_utils.Database], None]:
    MIGRATIONS.append(fn)
    return fn


@_migration
def _v1_event_log_and_outbox(db: sqlite_utils.Database) -> None:
    db["events"].create(
        {"seq": int, "id": str, "ts": str, "type": str, "priority": int, "body": bytes},
        pk="seq", not_null={"id", "ts", "type", "body"},
    )
    db["events"].create_index(["id"], unique=True)
    db["events"].create_index(["ts"])
    db["outbox"].create({"seq": int}, pk="seq", foreign_keys=[("seq", "events", "seq")])
    db["state"].create({"key": str, "value": bytes}, pk="key")
    db["commands_seen"].create({"id": str, "ts": str}, pk="id")


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
        conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro", uri=True,
                               isolation_level=None, timeout=10)
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


@dataclass
class _Job:
    drafts: Sequence[Draft] = ()
    state: dict[str, Any] | None = None
    ack_seqs: Sequence[int] = ()
    future: asyncio.Future[list[wire.Event]] | None = None
    created: float = field(default_factory=time.monotonic)


_enc = msgspec.json.Encoder()
R = TypeVar("R")


def open_db(path: Path) -> sqlite3.Connection:
    """Open (creating and migrating) the store file. The connection belongs to the calling thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    db = sqlite_utils.Database(conn)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(f"{path}: schema version {version} is newer than this gateway knows ({len(MIGRATIONS)})")
    for i in range(version, len(MIGRATIONS)):
        with db.conn:
            conn.execute("BEGIN IMMEDIATE")
            MIGRATIONS[i](db)
            conn.execute(f"PRAGMA user_version={i + 1}")
        log.info("store %s migrated to schema v%d", path, i + 1)
    return conn


class Store:
    """Async facade over the store file. Use as ``async with Store(...) as store:``."""

    def __init__(self, path: Path, *, site: str, gateway: str, batch_max: int = 500,
                 ring_max: int = 100_000, wall: Callable[[], datetime] = wire.utcnow,
                 retention_days: float | None = None, retention_rows: int | None = None,
                 prune_chunk: int = 500, prune_every_s: float = 600.0) -> None:
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
        self.committed = asyncio.Event()  # set after each commit that added events; the uplink clears it
        self.last_seq = 0
        self.on_fault: Callable[[str | None], None] | None = None
        self.dropped = 0
        self.replaced: CorruptReplaced | None = None  # set at open when a corrupt file was moved aside
        self.last_urgent_seq = 0  # newest seq ever committed to the urgent lane (the uplink skips an empty lane)
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

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Store:
        loop = asyncio.get_running_loop()
        self._next_seq, self.last_urgent_seq = await loop.run_in_executor(self._executor, self._open_writer)
        self.last_seq = self._next_seq - 1
        self._writer_task = asyncio.create_task(self._writer(), name=f"gateway[{self.gateway}].store.writer")
        if await self.outbox_depth():
            self.committed.set()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Drain what is queued (a few seconds at most), then close the connections."""
        if self._writer_task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.drain(), timeout=5.0)
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_conn)
        await loop.run_in_executor(self._reader, self._close_conn)
        self._executor.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    async def drain(self) -> None:
        """Wait until everything queued so far is committed (callers bound it: a full disk makes it wait)."""
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
        urgent = self._conn().execute(
            "SELECT max(o.seq) FROM outbox o JOIN events e ON e.seq = o.seq WHERE e.priority >= ?",
            (URGENT_PRIORITY,)).fetchone()
        return int(row[0] or 0) + 1, int(urgent[0] or 0)

    # ------------------------------------------------------------ writes

    def submit(self, drafts: Sequence[Draft], state: dict[str, Any] | None = None
               ) -> asyncio.Future[list[wire.Event]]:
        """Queue drafts (and state changes) for one transaction; the future gives the stored events.

        Never blocks and never fails for lack of disk: the work waits in memory until it can be written.
        Past ``ring_max`` queued drafts the oldest routine work is refused (counted in ``dropped``).
        """
        fut: asyncio.Future[list[wire.Event]] = asyncio.get_running_loop().create_future()
        if self._pending + len(drafts) > self.ring_max:
            self.dropped += len(drafts)
            fut.set_exception(StoreError("store backlog full"))
            return fut
        self._pending += len(drafts)
        self._queue.put_nowait(_Job(drafts=drafts, state=state, future=fut))
        return fut

    async def append(self, drafts: Sequence[Draft], state: dict[str, Any] | None = None) -> list[wire.Event]:
        return await self.submit(drafts, state)

    def acknowledge(self, seqs: Iterable[int]) -> None:
        """The portal has stored these: forget them from the outbox (the event log keeps them)."""
        seqs = list(seqs)
        if seqs:
            self._queue.put_nowait(_Job(ack_seqs=seqs))

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while True:
            jobs = [await self._next_job()]
            n = len(jobs[0].drafts)
            while not self._queue.empty() and n < self.batch_max:
                job = self._queue.get_nowait()
                jobs.append(job)
                n += len(job.drafts)
            while True:
                try:
                    results = await loop.run_in_executor(self._executor, self._commit, jobs)
                    break
                except (sqlite3.OperationalError, sqlite3.DatabaseError, OSError) as e:
                    # Disk full, read-only file, I/O error: keep the jobs, say so, try again later.
                    self._set_fault(f"storage: {e}")
                    self._fault_peak = max(self._fault_peak, self._pending)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            backoff = 0.05
            self._set_fault(None)
            added = False
            for job, events in zip(jobs, results, strict=True):
                self._pending -= len(job.drafts)
                added = added or bool(events)
                if job.future is not None and not job.future.done():
                    job.future.set_result(events)
                self._queue.task_done()
            if added:
                self.committed.set()

    async def _next_job(self) -> _Job:
        """The next queued job. While the queue is idle, prune the event log when due, a chunk at a time."""
        loop = asyncio.get_running_loop()
        while self.retention_days is not None or self.retention_rows is not None:
            now = time.monotonic()
            if not self._queue.empty() or self.fault:
                break
            if now < self._prune_due:
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(self._queue.get(), self._prune_due - now)
                continue
            try:
                n = await loop.run_in_executor(self._executor, self._prune_chunk)
            except (sqlite3.Error, OSError) as e:
                if not self._prune_logged:
                    self._prune_logged = True
                    log.warning("store %s: retention failed: %s (retried every %.0f s)", self.path, e,
                                self.prune_every_s)
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
        d = Draft(type="store.fault", device="gateway", place=wire.Place(site=self.site), priority=wire.Priority.FAULT,
                  data={"detail": self._fault_first[:300], "since": self._fault_since.isoformat(),
                        "until": until.isoformat(), "waited": self._fault_peak, "dropped": self.dropped})
        self._fault_since = None
        self._pending += 1
        self._queue.put_nowait(_Job(drafts=[d]))

    def _commit(self, jobs: list[_Job]) -> list[list[wire.Event]]:
        conn = self._conn()
        seq = self._next_seq
        out: list[list[wire.Event]] = []
        rows: list[tuple[int, str, str, str, int, bytes]] = []
        acks: list[tuple[int]] = []
        states: list[tuple[str, bytes]] = []
        urgent = 0
        for job in jobs:
            events = []
            for d in job.drafts:
                ts = d.ts or self._wall()
                ev = wire.Event(
                    id=str(ULID.from_datetime(ts)), seq=seq, ts=ts, type=d.type, device=d.device,
                    place=d.place, point=d.point, priority=int(d.priority), data=d.data,
                )
                rows.append((seq, ev.id, ts.isoformat(), ev.type, ev.priority, _enc.encode(ev)))
                events.append(ev)
                if ev.priority >= URGENT_PRIORITY:
                    urgent = seq
                seq += 1
            out.append(events)
            acks.extend((s,) for s in job.ack_seqs)
            if job.state:
                states.extend((k, _enc.encode(v)) for k, v in job.state.items())
        conn.execute("BEGIN IMMEDIATE")
        try:
            if rows:
                conn.executemany("INSERT INTO events(seq, id, ts, type, priority, body) VALUES (?,?,?,?,?,?)", rows)
                conn.executemany("INSERT INTO outbox(seq) VALUES (?)", [(r[0],) for r in rows])
            if acks:
                conn.executemany("DELETE FROM outbox WHERE seq = ?", acks)
            if states:
                conn.executemany("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", states)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._next_seq = seq
        self.last_seq = seq - 1
        if urgent:
            self.last_urgent_seq = urgent
        return out

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
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events e WHERE e.seq <= ? AND (" +
                    " OR ".join(conds) + ") AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.seq = e.seq)"
                    " ORDER BY e.seq LIMIT ?)", (bound, *args, self.prune_chunk)).rowcount
            if cutoff is not None:  # command ids are only needed while a re-delivery could still come
                conn.execute("DELETE FROM commands_seen WHERE id IN (SELECT id FROM commands_seen WHERE ts < ? "
                             "LIMIT ?)", (cutoff, self.prune_chunk))
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

    async def outbox_after(self, after_seq: int, limit: int, *, lane: Literal["all", "urgent", "routine"] = "all",
                           upto: int | None = None) -> list[tuple[int, bytes]]:
        """(seq, encoded event) of outbox rows past ``after_seq`` (and not past ``upto``), in seq order: all of
        them, or only one lane (urgent: priority >= :data:`URGENT_PRIORITY`)."""
        sql = "SELECT o.seq, e.body FROM outbox o JOIN events e ON e.seq = o.seq WHERE o.seq > ?"
        args: list[int] = [after_seq]
        if upto is not None:
            sql += " AND o.seq <= ?"
            args.append(upto)
        if lane != "all":
            sql += " AND e.priority >= ?" if lane == "urgent" else " AND e.priority < ?"
            args.append(URGENT_PRIORITY)
        args.append(limit)

        def q(c: sqlite3.Connection) -> list[tuple[int, bytes]]:
            return c.execute(sql + " ORDER BY o.seq LIMIT ?", args).fetchall()
        return await self._read(q)

    async def event_count(self) -> int:
        return int((await self._read(lambda c: c.execute("SELECT count(*) FROM events").fetchone()))[0])

    async def outbox_depth(self) -> int:
        return int((await self._read(lambda c: c.execute("SELECT count(*) FROM outbox").fetchone()))[0])

    async def get_state(self, key: str) -> Any:
        row = await self._read(lambda c: c.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone())
        return msgspec.json.decode(row[0]) if row else None

    async def events(self, after_seq: int = 0, limit: int = 1000) -> list[wire.Event]:
        rows = await self._read(lambda c: c.execute(
            "SELECT body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall())
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
