"""The store as the portal runs it: one batching writer thread, one reader thread, over either engine.

Every write is an :class:`Op` queued on an asyncio queue. One task pumps the queue into a single-thread executor
that owns the write connection; whatever has queued up while the previous transaction ran is committed in the next
one (each op in its own savepoint, so one failing op does not undo the others). Callers await their op's future;
listeners registered with :meth:`Store.add_commit_listener` see every committed (op, result) pair *after* the
commit, which is when the ingest may acknowledge events to a gateway and the hub may show them (and where a
notifier can tell other instances).

Reads run on a second connection in a reader thread, so the event loop never waits on the database.

On SQLite the writer keeps each gateway's sequence bookkeeping in memory (it is the only writer). On a shared
store (PostgreSQL, several instances) each transaction reads the gateway's row again under the store's write lock,
so what another instance stored is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from gateway import wire
from portal.store.basics import now_text, ts_text
from portal.store.engine import POSTGRESQL, Conn, Error, OperationalError, Postgres, Target, connect
from portal.store.errors import StoreConflict, StoreError
from portal.store.schema import bind_key, migrate
from portal.store.seqs import GatewaySnapshot, GatewayState, add_seq, gateway_state, load_gateways
from portal.store.storekey import StoreKey

log = logging.getLogger("portal.store")

T = TypeVar("T")


def open_db(target: Target, key: StoreKey | None = None) -> Any:
    """A migrated write connection, for command-line tools that run beside the portal. ``key``: the store key,
    needed to upgrade a store, to write audit rows and to seal or print plate codes."""
    if not isinstance(target, Postgres):
        target.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(target, key=key)
    try:
        migrate(conn)
        bind_key(conn)
    except BaseException:
        conn.close()
        raise
    return conn


# ---------------------------------------------------------------- write operations


class Tx:
    """What an op sees inside the writer thread: the connection and the gateway states.

    On a shared store a gateway's state is read from its row the first time a transaction needs it (the store's
    write lock is held: no other instance changes it until the commit); on SQLite the writer's copy is the truth.
    """

    def __init__(self, conn: Conn, gateways: dict[tuple[str, str], GatewayState]) -> None:
        self.conn = conn
        self.gateways = gateways
        self._fresh: set[tuple[str, str]] = set()
        self._dirty: dict[tuple[str, str], GatewayState] | None = None  # see read_ahead

    def read_ahead(self, keys: Iterable[tuple[str, str]]) -> None:
        """Shared store, in a transaction that holds these gateways' locks and whose ops run without savepoints (a
        failure runs the whole transaction again): their rows read now in one statement (made where missing), and
        every :meth:`save_gateway` kept until :meth:`write_back` writes them in one statement: two round trips
        per transaction instead of two per op."""
        keys = sorted(set(keys) - self._fresh)
        for first in (True, False):
            if not keys:
                break
            sites, gws = [k[0] for k in keys], [k[1] for k in keys]
            if not first:  # their first events anywhere
                self.conn.execute(
                    "INSERT INTO gateways (site, gateway) SELECT * FROM unnest(?::text[], ?::text[])"
                    " ON CONFLICT DO NOTHING",
                    (sites, gws),
                )
            wanted = set(keys)
            for row in self.conn.execute(  # by the primary key's index (a join with unnest may scan the table)
                "SELECT * FROM gateways WHERE site = ANY(?) AND gateway = ANY(?)", (sorted(set(sites)), gws)
            ):
                st = gateway_state(row)
                if (st.site, st.gateway) in wanted:
                    self.gateways[(st.site, st.gateway)] = st
                    self._fresh.add((st.site, st.gateway))
            keys = [k for k in keys if k not in self._fresh]
        self._dirty = {}

    def write_back(self) -> None:
        """What :meth:`read_ahead` kept, written in one statement."""
        dirty, self._dirty = self._dirty, None
        if not dirty:
            return
        # one UPDATE by primary key per gateway, sent in one pipeline (psycopg's executemany): an UPDATE ... FROM
        # unnest(...) may join by scanning the table, whose dead row versions grow with every transaction
        self.conn.executemany(_SAVE_GATEWAY, [_gateway_values(st) for st in dirty.values()])

    def gateway(self, site: str, gateway: str) -> GatewayState:
        key = (site, gateway)
        if getattr(self.conn, "shared", False) and key not in self._fresh:
            row = self.conn.execute("SELECT * FROM gateways WHERE site = ? AND gateway = ?", key).fetchone()
            if row is None:  # its first event anywhere
                self.conn.execute(
                    "INSERT INTO gateways (site, gateway) VALUES (?, ?) ON CONFLICT DO NOTHING", (site, gateway)
                )
                row = self.conn.execute("SELECT * FROM gateways WHERE site = ? AND gateway = ?", key).fetchone()
            self.gateways[key] = gateway_state(row)
            self._fresh.add(key)
        st = self.gateways.get(key)
        if st is None:
            self.conn.execute(
                "INSERT INTO gateways (site, gateway) VALUES (?, ?) ON CONFLICT DO NOTHING", (site, gateway)
            )
            st = self.gateways[key] = GatewayState(site, gateway)
        return st

    def save_gateway(self, st: GatewayState) -> None:
        if self._dirty is not None:
            self._dirty[(st.site, st.gateway)] = st
            return
        self.conn.execute(_SAVE_GATEWAY, _gateway_values(st))


_SAVE_GATEWAY = (
    "UPDATE gateways SET contiguous_seq=?, max_seq=?, islands=?, open_gaps=?, gaps_noticed=?, gaps_closed=?,"
    " events_stored=?, last_event_at=?, status=?, status_ts=?, status_changed_at=?, version=?"
    " WHERE site=? AND gateway=?"
)


def _gateway_values(st: GatewayState) -> tuple[Any, ...]:
    """A gateway's row as :meth:`Tx.save_gateway` writes it: its columns, then its key."""
    return (
        st.contiguous_seq,
        st.max_seq,
        json.dumps(st.islands),
        json.dumps(st.open_gaps),
        st.gaps_noticed,
        st.gaps_closed,
        st.events_stored,
        st.last_event_at,
        st.status,
        st.status_ts,
        st.status_changed_at,
        st.version,
        st.site,
        st.gateway,
    )


@dataclass(frozen=True, slots=True)
class Notice:
    """News of a commit for the other instances sharing the store (a ``kind`` and a small JSON object), sent with the
    commit (:meth:`Op.notice`); another instance's commit listeners that are not ``local_only`` hear it as
    ``(PeerCommit, Notice)`` (:meth:`Store.peer_committed`)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


#: what the instances' commit listeners hear when notices may have been lost (the listening connection was away)
MISSED = Notice("missed")


class Op:
    """A unit of writing. ``apply`` runs in the writer thread inside a savepoint of a transaction."""

    def apply(self, tx: Tx) -> Any:
        raise TypeError(f"{type(self).__name__} must define apply()")

    def notice(self, result: Any) -> Notice | None:
        """What the other instances sharing the store must hear of this op's commit (None: nothing)."""
        return None

    def prepare(self) -> None:
        """Runs in the writer thread before the transaction begins (outside every lock): work that needs no
        database, so that the transaction holds its locks only for its statements."""

    def forget_early(self) -> None:
        """Before each attempt at a transaction: what :func:`insert_early` wrote for this op in an earlier,
        rolled-back one is gone."""

    def gateway_locks(self) -> frozenset[tuple[str, str]] | None:
        """On a shared store: the gateways whose rows this op writes, when that is all it writes besides rows no
        other transaction reads under the write lock (events by their unique id, counters upserted in one
        statement). Such ops run beside other instances' under the lock's shared form and a lock per gateway
        (:meth:`portal.store.engine.PgConnection.begin`). None (the default): the whole store's lock."""
        return None


class PeerCommit(Op):
    """Stands for an op another instance committed, whose result reached this one by notification
    (:meth:`Store.peer_committed`); never applied here."""

    def apply(self, tx: Tx) -> Any:
        raise TypeError("a peer's commit is not applied again")


class FnOp(Op):
    def __init__(self, fn: Callable[[Any], Any], notice: Notice | None = None) -> None:
        self.fn = fn
        self._notice = notice

    def apply(self, tx: Tx) -> Any:
        return self.fn(tx.conn)

    def notice(self, result: Any) -> Notice | None:
        return self._notice


_enc = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class BatchResult:
    site: str
    gateway: str
    ack_seqs: list[int]  # every seq now stored under the same id: new ones and re-sends
    new_events: list[dict[str, Any]]  # as the API shows them
    duplicates: int
    conflicts: list[int]  # seqs already stored under another id of this gateway (its store was reset)
    gap_opened: list[tuple[int, int]]
    gaps_closed: list[tuple[int, int]]
    snapshot: GatewaySnapshot


class StoreBatch(Op):
    """Store a decoded event batch idempotently (by id) and advance the gateway's seq bookkeeping.

    A seq this gateway already used for another event means its store was reset (a new SD card, a corrupt
    file replaced): its numbering starts again at 1. Such an event is still stored, under a number of its
    own below zero (the old event keeps its row), acknowledged, and counted as a ``seq-conflict``: an alarm
    is never held back because a number was used before."""

    def __init__(self, batch: wire.EventBatch) -> None:
        self.batch = batch
        self._rows: list[tuple[Any, ...]] | None = None
        self._shown: list[dict[str, Any]] | None = None  # the rows as the API shows them, but for received_at
        self._inserted: set[str] | None = None  # what insert_early inserted of it, for apply

    def gateway_locks(self) -> frozenset[tuple[str, str]]:
        return frozenset({(self.batch.site, self.batch.gateway)})

    def forget_early(self) -> None:
        self._inserted = None

    def _stamp(self, received: str) -> None:
        if self._rows:
            self._rows = [(*r[:-1], received) for r in self._rows]

    def prepare(self) -> None:
        b = self.batch
        received = now_text()
        self._rows = [
            (
                ev.id,
                b.site,
                b.gateway,
                ev.seq,
                ts_text(ev.ts),
                ev.type,
                ev.device,
                ev.point,
                int(ev.priority),
                _enc.encode(ev.place).decode(),
                _enc.encode(ev.data).decode(),
                received,
            )
            for ev in b.events
        ]
        # made here, before the transaction: under a shared store's gateway locks every millisecond of Python is a
        # millisecond the other instances wait; place and data as the batch decoded them (what event_dict would
        # parse back from the row's JSON: parsing it was 6% of a busy centre instance's samples)
        self._shown = [
            {**dict(zip(EVENT_COLUMNS, r, strict=True)), "place": msgspec.to_builtins(ev.place), "data": ev.data}
            for ev, r in zip(b.events, self._rows, strict=True)
        ]

    def apply(self, tx: Tx) -> BatchResult:
        b = self.batch
        conn = tx.conn
        if self._rows is None:
            self.prepare()
        inserted, self._inserted = self._inserted, None
        if inserted is None:
            self._stamp(now_text())  # received now, under the transaction's locks (early rows: when inserted)
        rows, shown = self._rows, self._shown
        assert rows is not None and shown is not None
        received = rows[0][-1] if rows else now_text()
        acks: list[int] = []
        new: list[dict[str, Any]] = []
        conflicts: list[int] = []
        dups = 0
        # PostgreSQL: the whole batch in one statement (a round trip per event was most of a batch's time); what
        # it did not insert (a re-send, a re-used seq) takes the one-by-one path below, as on SQLite
        if inserted is None and conn.dialect == POSTGRESQL and len(rows) > 1:
            inserted = insert_events(conn, rows)
        owners: dict[str, tuple[str, str]] | None = None  # PostgreSQL: who stored the ids it did not insert
        if inserted is not None and len(inserted) < len(rows):
            owners = {
                r["id"]: (r["site"], r["gateway"])
                for r in conn.execute(
                    "SELECT id, site, gateway FROM events WHERE id = ANY(?)",
                    ([ev.id for ev in b.events if ev.id not in inserted],),
                )
            }
        for ev, row, seen in zip(b.events, rows, shown, strict=True):
            if inserted is not None:
                fresh = ev.id in inserted
                inserted.discard(ev.id)  # the same id twice in one batch: the second is a re-send
            else:
                fresh = (
                    conn.execute(
                        "INSERT INTO events (id, site, gateway, seq, ts, type, device, point, priority, place, data,"
                        " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        row,
                    ).rowcount
                    == 1
                )
            if fresh:
                acks.append(ev.seq)
                new.append({**seen, "received_at": row[-1]})
                continue
            if owners is not None:
                owner = owners.get(ev.id)
            else:
                old = conn.execute("SELECT site, gateway FROM events WHERE id = ?", (ev.id,)).fetchone()
                owner = (old["site"], old["gateway"]) if old is not None else None
            if owner is not None:
                if owner == (b.site, b.gateway):  # a re-send (perhaps re-numbered)
                    acks.append(ev.seq)
                    dups += 1
                continue  # another gateway's event id: refused, not acknowledged
            low = conn.execute(
                "SELECT coalesce(min(seq), 0) FROM events WHERE site = ? AND gateway = ? AND seq < 0",
                (b.site, b.gateway),
            ).fetchone()[0]
            row = (*row[:3], int(low) - 1, *row[4:])
            conn.execute(
                "INSERT INTO events (id, site, gateway, seq, ts, type, device, point, priority, place,"
                " data, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            if owners is not None:
                owners[ev.id] = (b.site, b.gateway)  # the same id again in this batch is a re-send now
            acks.append(ev.seq)
            new.append(event_dict(row))
            conflicts.append(ev.seq)
        st = tx.gateway(b.site, b.gateway).copy()
        opened: list[tuple[int, int]] = []
        closed: list[tuple[int, int]] = []
        for e in new:
            if e["seq"] < 0:
                continue  # re-numbered: outside the gateway's current numbering
            o, c = add_seq(st, e["seq"])
            if o:
                opened.append(o)
            closed.extend(c)
        if new:
            st.events_stored += len(new)
            st.last_event_at = received
            tx.save_gateway(st)
        tx.gateways[(b.site, b.gateway)] = st
        return BatchResult(b.site, b.gateway, acks, new, dups, conflicts, opened, closed, st.snapshot())


@dataclass(frozen=True, slots=True)
class StatusResult:
    changed: bool
    snapshot: GatewaySnapshot


class SetStatus(Op):
    def __init__(self, site: str, gateway: str, status: wire.Status) -> None:
        self.site, self.gateway, self.status = site, gateway, status

    def gateway_locks(self) -> frozenset[tuple[str, str]]:
        return frozenset({(self.site, self.gateway)})

    def apply(self, tx: Tx) -> StatusResult:
        st = tx.gateway(self.site, self.gateway).copy()
        changed = st.status != self.status.state
        st.status = self.status.state
        st.status_ts = ts_text(self.status.ts) if self.status.ts else None
        st.version = self.status.version
        if changed:
            st.status_changed_at = now_text()
        tx.save_gateway(st)
        tx.gateways[(self.site, self.gateway)] = st
        return StatusResult(changed, st.snapshot())


class EnsureGateways(Op):
    def __init__(self, keys: Iterable[tuple[str, str]]) -> None:
        self.keys = list(keys)

    def gateway_locks(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.keys)

    def apply(self, tx: Tx) -> list[GatewaySnapshot]:
        return [tx.gateway(s, g).snapshot() for s, g in self.keys]


class CountRejection(Op):
    def __init__(self, reason: str, source: str, detail: str, n: int = 1) -> None:
        self.reason, self.source, self.detail, self.n = reason, source, detail[:300], n

    def gateway_locks(self) -> frozenset[tuple[str, str]]:
        return frozenset()  # one upsert: concurrent ones add up

    def apply(self, tx: Tx) -> None:
        at = now_text()
        tx.conn.execute(
            "INSERT INTO rejections (reason, source, count, first_at, last_at, last_detail) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (reason, source) DO UPDATE SET count = rejections.count + excluded.count,"
            " last_at = excluded.last_at,"
            " last_detail = excluded.last_detail",
            (self.reason, self.source, self.n, at, at, self.detail),
        )


def insert_early(conn: Conn, ops: Sequence[Op]) -> bool:
    """PostgreSQL, in a transaction under the store's shared lock only: the events of every event batch among
    ``ops`` in one statement, in the order of their ids, so that two instances inserting the same re-sent events
    wait for each other in one order and never in a circle. Each id inserted is the first batch's that carries it;
    a later batch's copy is a re-send. True if anything was written (a failure of an op's apply must then undo the
    whole transaction: its savepoint would not hold its rows)."""
    batches = [op for op in ops if isinstance(op, StoreBatch) and op._rows]
    if conn.dialect != POSTGRESQL or not batches:
        return False
    received = now_text()  # the locks it waited for are behind it
    for op in batches:
        op._stamp(received)
    rows = sorted((r for op in batches for r in op._rows or ()), key=lambda r: r[0])
    inserted = insert_events(conn, rows)
    for op in batches:
        mine = {ev.id for ev in op.batch.events} & inserted
        op._inserted = mine
        inserted -= mine
    return True


def insert_events(conn: Conn, rows: list[tuple[Any, ...]]) -> set[str]:
    """PostgreSQL: insert events rows (the :data:`EVENT_COLUMNS`, in that order) in one statement, skipping any
    that break a uniqueness rule (their id stored already, or their gateway's seq); returns the ids inserted."""
    cols = list(zip(*rows, strict=True))
    cur = conn.execute(
        "INSERT INTO events (id, site, gateway, seq, ts, type, device, point, priority, place, data, received_at)"
        " SELECT id, site, gateway, seq, ts, type, device, point, priority, place, data, received_at"
        " FROM unnest(?::text[], ?::text[], ?::text[], ?::bigint[], ?::text[], ?::text[], ?::text[], ?::text[],"
        " ?::bigint[], ?::text[], ?::text[], ?::text[]) WITH ORDINALITY AS t(id, site, gateway, seq, ts, type,"
        " device, point, priority, place, data, received_at, k) ORDER BY k"  # in the rows' order, always
        " ON CONFLICT DO NOTHING RETURNING id",
        [list(c) for c in cols],
    )
    return {r[0] for r in cur.fetchall()}


EVENT_COLUMNS = (
    "id",
    "site",
    "gateway",
    "seq",
    "ts",
    "type",
    "device",
    "point",
    "priority",
    "place",
    "data",
    "received_at",
)


def event_dict(row: Sequence[Any]) -> dict[str, Any]:
    """An events row (the :data:`EVENT_COLUMNS`, in that order) as the API shows it."""
    d = dict(zip(EVENT_COLUMNS, tuple(row), strict=True))
    d["place"] = json.loads(d["place"])
    d["data"] = json.loads(d["data"])
    return d


# ---------------------------------------------------------------- reads


@dataclass(frozen=True, slots=True)
class EventQuery:
    before: str | None = None  # event id: newer-first page of older events
    after: str | None = None  # event id: older-first page of newer events
    after_seq: int | None = None  # with gateway: that gateway's events above this seq, by seq
    site: str | None = None
    gateway: str | None = None
    types: tuple[str, ...] = ()
    limit: int = 100
    sites: tuple[str, ...] | None = None  # only these sites (a user's scope); None: every site


def query_events(conn: Conn, q: EventQuery) -> list[dict[str, Any]]:
    where: list[str] = []
    args: list[Any] = []
    if q.sites is not None:
        where.append(f"site IN ({', '.join('?' * len(q.sites))})" if q.sites else "0 = 1")
        args.extend(q.sites)
    if q.site:
        where.append("site = ?")
        args.append(q.site)
    if q.gateway:
        where.append("gateway = ?")
        args.append(q.gateway)
    if q.types:
        where.append(f"type IN ({', '.join('?' * len(q.types))})")
        args.extend(q.types)
    if q.after_seq is not None:
        where.append("seq > ?")
        args.append(q.after_seq)
        order = "site, gateway, seq"
    elif q.after is not None:
        where.append("id > ?")
        args.append(q.after)
        order = "id"
    else:
        if q.before is not None:
            where.append("id < ?")
            args.append(q.before)
        order = "id DESC"
    sql = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {order} LIMIT ?"
    args.append(q.limit)
    return [event_dict(r) for r in conn.execute(sql, args)]


def load_rejections(conn: Conn) -> dict[tuple[str, str], int]:
    return {(r["reason"], r["source"]): int(r["count"]) for r in conn.execute("SELECT * FROM rejections")}


# ---------------------------------------------------------------- the store


async def shutdown_executor(ex: ThreadPoolExecutor, wait_s: float = 5.0) -> None:
    """Shut a thread pool down and wait (off the loop's back) until its threads have ended."""
    ex.shutdown(wait=False, cancel_futures=True)
    threads = list(getattr(ex, "_threads", ()))
    for _ in range(int(wait_s / 0.005)):
        if not any(t.is_alive() for t in threads):
            return
        await asyncio.sleep(0.005)
    log.warning("worker threads %s did not end within %.0f s", [t.name for t in threads if t.is_alive()], wait_s)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark a failure as seen; the writer has logged it


_STOP = object()
CommitListener = Callable[[list[tuple[Op, Any]]], None]
#: Runs in the writer thread inside each transaction, after its ops, with the connection and the ops that
#: succeeded (PostgreSQL: where a NOTIFY is sent, so that it is delivered if and only if the transaction commits).
BeforeCommit = Callable[[Any, list[tuple[Op, Any]]], None]
#: SQLSTATEs of a transaction PostgreSQL gave up on to let another go on: the writer runs it once more.
_RETRY_STATES = frozenset({"40P01", "40001"})


class _Retry(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Redo(Exception):
    """An op failed in a transaction that wrote early: roll back, run it again without early writes."""


#: What ends a write transaction with a rollback (the engines' errors, a refused op, a redo).
_ROLLBACK: tuple[type[Exception], ...] = (*Error, StoreError, _Redo)


class Store:
    """Open with :meth:`start`, close with :meth:`close` (which commits everything queued first)."""

    def __init__(
        self,
        target: Target,
        *,
        batch_max: int = 256,
        queue_max: int = 10_000,
        observe_commit: Callable[[float], None] | None = None,
        key: StoreKey | None = None,
    ) -> None:
        self.target: Target = target if isinstance(target, Postgres) else Path(target)
        self.key = key  # the store key: both connections carry it (audit rows, plate codes)
        self._observe_commit = observe_commit
        self.batch_max = batch_max
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_max)
        self._wexec: ThreadPoolExecutor | None = None
        self._rexec: ThreadPoolExecutor | None = None
        self._wconn: Any = None
        self._rconn: Any = None
        self._states: dict[tuple[str, str], GatewayState] = {}
        self._pump: asyncio.Task[None] | None = None
        self._listeners: list[tuple[CommitListener, bool]] = []  # (listener, local_only)
        self._before_commit: BeforeCommit | None = None
        self.gateways: dict[tuple[str, str], GatewaySnapshot] = {}  # loop-side copy, for health
        self.ok = False
        self.last_error = ""
        self.commits = 0
        self.last_commit_s = 0.0
        self._closing = False

    # -- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wexec = ThreadPoolExecutor(1, thread_name_prefix="portal.store.writer")
        self._rexec = ThreadPoolExecutor(1, thread_name_prefix="portal.store.reader")
        try:
            await loop.run_in_executor(self._wexec, self._open_writer)
            await loop.run_in_executor(self._rexec, self._open_reader)
        except BaseException:
            await self._shutdown_threads()
            raise
        self.gateways = {k: s.snapshot() for k, s in self._states.items()}
        self.ok = True
        self._pump = asyncio.create_task(self._run_pump(), name="portal.store.writer")

    @property
    def shared(self) -> bool:
        """Several instances may write to this store (PostgreSQL): limits and locks must live in it."""
        return isinstance(self.target, Postgres)

    def _open_writer(self) -> None:
        if isinstance(self.target, Path):
            self.target.parent.mkdir(parents=True, exist_ok=True)
        self._wconn = connect(self.target, key=self.key)
        migrate(self._wconn)
        bind_key(self._wconn)
        self._states = load_gateways(self._wconn)

    def _open_reader(self) -> None:
        self._rconn = connect(self.target, readonly=True, key=self.key)

    def _reconnect(self, attr: str) -> Any:
        """A shared store's connection again after the server went away (the next transaction or read retries)."""
        conn = getattr(self, attr)
        if conn is not None and getattr(conn, "broken", False):
            with contextlib.suppress(Exception):
                conn.close()
            setattr(self, attr, None)
            log.warning("the %s's connection to the %s was lost: connecting again", attr[1:], self.target)
            setattr(self, attr, connect(self.target, readonly=attr == "_rconn", key=self.key))
        return getattr(self, attr)

    async def close(self) -> None:
        """Commit what is queued, then close both connections and threads."""
        if self._closing:
            return
        self._closing = True
        if self._pump is not None and not self._pump.done():
            await self._queue.put(_STOP)
            try:
                await self._pump
            except Exception:
                log.exception("store writer failed while closing")
        await self._shutdown_threads()
        self.ok = False

    async def _shutdown_threads(self) -> None:
        loop = asyncio.get_running_loop()
        for ex, attr in ((self._wexec, "_wconn"), (self._rexec, "_rconn")):
            if ex is None:
                continue

            def _close(attr: str = attr) -> None:
                conn = getattr(self, attr)
                if conn is not None:
                    conn.close()
                    setattr(self, attr, None)

            try:
                await loop.run_in_executor(ex, _close)
            except Exception:
                log.exception("closing the %s connection failed", attr)
        for ex in (self._wexec, self._rexec):
            if ex is not None:
                await shutdown_executor(ex)
        self._wexec = self._rexec = None

    # -- writing

    def add_commit_listener(self, cb: CommitListener, *, local_only: bool = False) -> None:
        """Call ``cb`` with every committed (op, result) pair after the commit. Unless ``local_only``, it is also
        called with what other instances of a shared store committed, as :meth:`peer_committed` hands it on
        (their event batches: ``(PeerCommit, BatchResult)`` pairs without acks to send)."""
        self._listeners.append((cb, local_only))

    def set_before_commit(self, fn: BeforeCommit | None) -> None:
        """Run ``fn`` inside every write transaction after its ops (in a savepoint of its own: its failure is logged
        and the ops still commit). One at a time; the monitoring centre's peer notices use it."""
        self._before_commit = fn

    def peer_committed(self, committed: list[tuple[Op, Any]]) -> None:
        """What another instance sharing the store committed: the gateways' snapshots follow (a newer count only)
        and every listener that is not ``local_only`` hears of it, as of a commit here."""
        for _op, value in committed:
            snap = getattr(value, "snapshot", None)
            if isinstance(snap, GatewaySnapshot):
                cur = self.gateways.get((snap.site, snap.gateway))
                if cur is None or snap.events_stored > cur.events_stored:
                    self.gateways[(snap.site, snap.gateway)] = snap
        for cb, local_only in self._listeners:
            if local_only:
                continue
            try:
                cb(committed)
            except Exception:
                log.exception("a commit listener failed on a peer's commit")

    async def enqueue(self, op: Op) -> asyncio.Future[Any]:
        """Queue an op (waiting only for room in the queue); the future resolves after its commit."""
        if self._closing or self._pump is None:
            raise StoreError("the store is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put((op, fut))
        return fut

    def enqueue_nowait(self, op: Op) -> asyncio.Future[Any] | None:
        """Queue an op from synchronous code; None when the store is closed or its queue is full."""
        if self._closing or self._pump is None:
            return None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((op, fut))
        except asyncio.QueueFull:
            return None
        fut.add_done_callback(_consume)
        return fut

    async def write(self, op: Op) -> Any:
        return await (await self.enqueue(op))

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        await self.write(FnOp(lambda c: None))

    async def run_write(self, fn: Callable[[Any], T], *, notice: Notice | None = None) -> T:
        """Run ``fn(conn)`` in a write transaction; ``notice``: what the other instances hear of its commit."""
        result: T = await self.write(FnOp(fn, notice))
        return result

    async def _run_pump(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wexec is not None
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is _STOP:
                break
            items = [first]
            while len(items) < self.batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                items.append(nxt)
            t0 = time.monotonic()
            results = []
            for run in self._runs(items):
                try:
                    results += await loop.run_in_executor(self._wexec, self._commit, [op for op, _ in run])
                except Exception as e:  # a bug in the writer itself: fail these writes, keep the writer alive
                    log.exception("store writer failed")
                    self.ok = False
                    self.last_error = str(e)
                    results += [(False, StoreError(f"writer failed: {e}"))] * len(run)
            self.last_commit_s = time.monotonic() - t0
            if self._observe_commit is not None:
                self._observe_commit(self.last_commit_s)
            committed: list[tuple[Op, Any]] = []
            for (op, fut), (ok, value) in zip(items, results, strict=True):
                if ok:
                    committed.append((op, value))
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
            for _op, value in committed:
                snap = getattr(value, "snapshot", None)
                if isinstance(snap, GatewaySnapshot):
                    self.gateways[(snap.site, snap.gateway)] = snap
                elif isinstance(value, list):
                    for s in value:
                        if isinstance(s, GatewaySnapshot):
                            self.gateways[(s.site, s.gateway)] = s
            if committed:
                for cb, _local in self._listeners:
                    try:
                        cb(committed)
                    except Exception:
                        log.exception("a commit listener failed")

    def _runs(self, items: list[Any]) -> list[list[Any]]:
        """On a shared store, the queued ops in runs of one lock scope each (a transaction apiece, in queue order):
        event batches and the like beside other instances' under the shared lock, the rest under the whole lock.
        One process writes to SQLite: everything in one transaction."""
        if not self.shared:
            return [items]
        runs: list[tuple[bool, list[Any]]] = []
        for item in items:
            fine = item[0].gateway_locks() is not None
            if runs and runs[-1][0] == fine:
                runs[-1][1].append(item)
            else:
                runs.append((fine, [item]))
        return [r for _, r in runs]

    def _commit(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        """Writer thread: one transaction, one savepoint per op; once more if PostgreSQL broke a deadlock or a
        serialization conflict by cancelling it, or if an op failed after writing early (then without early
        writes, so that its savepoint undoes all it wrote)."""
        early, retried = True, False
        while True:
            try:
                return self._commit_once(ops, early=early)
            except _Redo as e:  # once at most: without early writes there is nothing to redo
                early = False
                log.info("store transaction run again without early writes: %s", e.__cause__)
            except _Retry as e:
                if retried:
                    return self._failed(ops, e.error)
                retried, early = True, False  # again under the gateways' locks from the start: no circle
                log.info("store transaction run again: %s", e.error)

    def _failed(self, ops: list[Op], e: Exception) -> list[tuple[bool, Any]]:
        if self.ok:
            log.error("store commit failed: %s", e)
        self.ok = False
        self.last_error = str(e)
        err = StoreError(f"commit failed: {e}")
        return [(False, err)] * len(ops)

    def _commit_once(self, ops: list[Op], *, early: bool = False) -> list[tuple[bool, Any]]:
        saved = {k: v for k, v in self._states.items()}
        out: list[tuple[bool, Any]] = []
        try:
            conn = self._reconnect("_wconn")
            assert conn is not None
            for op in ops:
                op.forget_early()
                try:
                    op.prepare()
                except Exception:  # apply meets the same fault inside its savepoint and fails alone
                    log.debug("preparing %s failed", type(op).__name__, exc_info=True)
            tx = Tx(conn, self._states)
            scope: frozenset[tuple[str, str]] | None = None
            if conn.shared:
                locks = [op.gateway_locks() for op in ops]
                if all(lk is not None for lk in locks):
                    scope = frozenset().union(*[lk for lk in locks if lk is not None])
            wrote_early = in_early = False
            if scope is not None and early:
                # the batches' events first, under the shared lock only (their ids' and seqs' uniqueness is the
                # database's to keep), then the gateways' locks for the bookkeeping: instances whose transactions
                # share gateways (all of them, as the broker spreads batches) wait for each other only that long
                conn.begin(frozenset())
                in_early = True
                wrote_early = insert_early(conn, ops)
                in_early = False
                conn.lock_gateways(scope)
            elif scope is not None:
                conn.begin(scope)
            else:
                conn.begin()
            if wrote_early:
                # an op that fails now runs the whole transaction again without early writes (its early rows are
                # outside any savepoint of its own): no savepoints, the gateways' rows read in one statement, and
                # their rows written, the other instances told and the transaction committed in one round trip
                # (a pipeline): what the gateways' locks are held through is that round trip and the commit's
                # flush, not four round trips each waiting for this thread's turn at the GIL
                assert scope is not None
                tx.read_ahead(scope)
                for op in ops:
                    try:
                        out.append((True, op.apply(tx)))
                    except Exception as e:
                        raise _Redo() from e
                try:
                    with conn.pipeline():
                        tx.write_back()
                        if self._before_commit is not None and out:
                            self._before_commit(conn, [(op, v) for op, (_ok, v) in zip(ops, out, strict=True)])
                        conn.execute("COMMIT")
                except Error as e:
                    if getattr(conn, "broken", False) or getattr(e, "sqlstate", None) in _RETRY_STATES:
                        raise
                    raise _Redo() from e  # a notice refused, say: again with the before-commit step in a savepoint
                except StoreError:
                    raise
                except Exception as e:  # the before-commit step failed before sending anything
                    raise _Redo() from e
            else:
                for op in ops:
                    before = {k: v for k, v in self._states.items()}
                    conn.execute("SAVEPOINT op")
                    try:
                        value = op.apply(tx)
                    except Exception as e:
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        self._states.clear()
                        self._states.update(before)
                        out.append((False, e))
                        if not isinstance(e, StoreConflict | ValueError):
                            log.exception("store op %s failed", type(op).__name__)
                    else:
                        conn.execute("RELEASE op")
                        out.append((True, value))
                done = [(op, v) for op, (ok, v) in zip(ops, out, strict=True) if ok]
                if self._before_commit is not None and done:
                    conn.execute("SAVEPOINT before_commit")
                    try:
                        self._before_commit(conn, done)
                    except Exception:
                        conn.execute("ROLLBACK TO before_commit")
                        log.exception("the store's before-commit step failed (the ops commit without it)")
                    conn.execute("RELEASE before_commit")
                conn.execute("COMMIT")
        except _ROLLBACK as e:
            with contextlib.suppress(*Error, StoreError):
                if self._wconn is not None and self._wconn.in_transaction:
                    self._wconn.execute("ROLLBACK")
            self._states.clear()
            self._states.update(saved)
            if isinstance(e, _Redo):
                raise
            if getattr(e, "sqlstate", None) in _RETRY_STATES:
                raise _Retry(e) from e
            if in_early:  # one op's rows refused: each op again in its own savepoint, as without early writes
                raise _Redo() from e
            return self._failed(ops, e)
        if not self.ok and not self._closing:
            log.info("store commits again")
        self.ok = True
        self.last_error = ""
        self.commits += 1
        return out

    # -- reading

    async def read(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(conn)`` on the reader thread's connection."""
        if self._rexec is None:
            raise StoreError("the store is closed")

        def run() -> T:
            conn = self._reconnect("_rconn")
            try:
                return fn(conn)
            except OperationalError:
                if not getattr(conn, "broken", False):
                    raise
            return fn(self._reconnect("_rconn"))  # the server dropped the connection: a read is safe to run again

        return await asyncio.get_running_loop().run_in_executor(self._rexec, run)

    async def events(self, q: EventQuery) -> list[dict[str, Any]]:
        return await self.read(lambda c: query_events(c, q))
