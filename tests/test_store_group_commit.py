"""The writer's group commit on PostgreSQL: the batches queued together go into one transaction, each batch's events
in one statement written before the gateways' locks are taken. What that must not change: a batch that fails stores
nothing and fails alone, a re-sent event is acknowledged and not stored again, and a seq used before under another
id is still stored (re-numbered). Real PostgreSQL (the tests' server), real store and writer thread."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from ulid import ULID

from gateway import wire
from portal.store import BatchResult, Postgres, Store, StoreBatch, connect
from portal.store.writer import Tx


def batch(gw: str, seqs: range, ids: dict[tuple[str, int], str] | None = None) -> wire.EventBatch:
    ids = {} if ids is None else ids
    evs = [
        wire.Event(
            id=ids.setdefault((gw, s), str(ULID())),
            seq=s,
            ts=datetime.now(UTC),
            type="test.synthetic",
            device="d",
            place=wire.Place(site="s1"),
            data={"n": s},
        )
        for s in seqs
    ]
    return wire.EventBatch(v=wire.SCHEMA_VERSION, site="s1", gateway=gw, events=evs)


class FailsAfterWriting(StoreBatch):
    """A batch whose bookkeeping breaks after its events were written (a bug's stand-in)."""

    def apply(self, tx: Tx) -> BatchResult:
        super().apply(tx)
        raise RuntimeError("bookkeeping broke")


def rows(target: Postgres, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = connect(target, readonly=True)
    try:
        return [tuple(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


async def test_a_failing_batch_in_a_group_stores_nothing_and_the_others_commit(pg_target: Postgres) -> None:
    store = Store(pg_target)
    await store.start()
    try:
        good = await store.enqueue(StoreBatch(batch("gw1", range(1, 101))))
        bad = await store.enqueue(FailsAfterWriting(batch("gw2", range(1, 101))))
        also = await store.enqueue(StoreBatch(batch("gw3", range(1, 51))))
        res = await good
        assert res.ack_seqs == list(range(1, 101))
        assert (await also).ack_seqs == list(range(1, 51))
        try:
            await bad
        except RuntimeError as e:
            assert "bookkeeping broke" in str(e)
        else:
            raise AssertionError("the failing batch reported success")
        assert store.commits >= 1
    finally:
        await store.close()
    counts = dict(rows(pg_target, "SELECT gateway, count(*) FROM events GROUP BY gateway"))
    assert counts == {"gw1": 100, "gw3": 50}  # none of gw2's: its early rows went with its failure
    books = {r[0]: r[1:] for r in rows(pg_target, "SELECT gateway, contiguous_seq, events_stored FROM gateways")}
    assert books["gw1"] == (100, 100) and books["gw3"] == (50, 50)
    assert books.get("gw2", (0, 0)) == (0, 0)


async def test_resends_and_reused_seqs_in_one_group(pg_target: Postgres) -> None:
    ids: dict[tuple[str, int], str] = {}
    store = Store(pg_target)
    await store.start()
    try:
        first = await store.write(StoreBatch(batch("gw1", range(1, 101), ids)))
        assert len(first.new_events) == 100
        # together in one transaction: a re-send of 51..150 (51..100 stored already), and a batch whose gateway
        # lost its store and numbers from 1 again under new ids
        resend = await store.enqueue(StoreBatch(batch("gw1", range(51, 151), ids)))
        reset = await store.enqueue(StoreBatch(batch("gw1", range(1, 11))))
        r1, r2 = await resend, await reset
    finally:
        await store.close()
    assert r1.ack_seqs == list(range(51, 151)) and r1.duplicates == 50
    assert [e["seq"] for e in r1.new_events] == list(range(101, 151))
    assert r2.ack_seqs == list(range(1, 11)) and r2.conflicts == list(range(1, 11))
    assert sorted(e["seq"] for e in r2.new_events) == list(range(-10, 0))
    assert rows(pg_target, "SELECT count(*), count(DISTINCT id) FROM events") == [(160, 160)]
    stored_ids = {r[0] for r in rows(pg_target, "SELECT id FROM events WHERE seq > 0")}
    assert stored_ids == {ids[("gw1", s)] for s in range(1, 151)}
    assert rows(pg_target, "SELECT contiguous_seq, events_stored FROM gateways WHERE gateway = 'gw1'") == [(150, 160)]


async def test_two_stores_on_one_database_store_overlapping_resends_once(pg_target: Postgres) -> None:
    """Two instances' writers, the same batches sent to both at once (a re-send crossing the first): each event
    stored once, both acknowledge every seq, the bookkeeping counts each once."""
    ids: dict[tuple[str, int], str] = {}
    a, b = Store(pg_target), Store(pg_target)
    await a.start()
    await b.start()
    try:
        gws = [f"gw{i}" for i in range(1, 9)]
        futs = []
        for lo in range(1, 1001, 100):
            for gw in gws:
                for store in (a, b):
                    futs.append(await store.enqueue(StoreBatch(batch(gw, range(lo, lo + 100), ids))))
        results = await asyncio.gather(*futs)
    finally:
        await a.close()
        await b.close()
    for r in results:
        assert len(r.ack_seqs) == 100
    assert sum(len(r.new_events) for r in results) == 8000
    assert rows(pg_target, "SELECT count(*), count(DISTINCT id) FROM events") == [(8000, 8000)]
    assert sorted(rows(pg_target, "SELECT gateway, contiguous_seq, events_stored, open_gaps FROM gateways")) == [
        (gw, 1000, 1000, "[]") for gw in sorted(gws)
    ]


async def test_a_before_commit_step_that_fails_leaves_the_batches_stored_once_and_the_notice_only_if_committed(
    pg_target: Postgres,
) -> None:
    """The batches' bookkeeping, the notice to the other instances and the COMMIT go in one pipeline: a notice the
    server refuses (or a step that raises before sending) must neither lose the batches nor store them twice, and
    a notice that was sent is delivered with the commit and never without it."""
    import psycopg

    calls: list[str] = []

    def step(conn: Any, done: list[tuple[Any, Any]]) -> None:
        calls.append("x")
        n = len(calls)
        if n == 1:
            raise RuntimeError("before-commit bug")  # raises before sending anything
        if n == 3:
            conn.execute("SELECT pg_notify(?, repeat('x', 9000))", ("gh_test",))  # refused: payload too long
        else:
            conn.execute("SELECT pg_notify(?, ?)", ("gh_test", f"call {n}"))

    listener = await psycopg.AsyncConnection.connect(pg_target.dsn, autocommit=True, passfile=str(pg_target.passfile))
    await listener.execute("LISTEN gh_test")
    store = Store(pg_target)
    await store.start()
    store.set_before_commit(step)
    try:
        ids: dict[tuple[str, int], str] = {}
        first = [await store.enqueue(StoreBatch(batch(g, range(1, 21), ids))) for g in ("gw1", "gw2")]
        r1 = [await f for f in first]  # call 1 raised: the transaction ran again, the step (call 2) in a savepoint
        second = [await store.enqueue(StoreBatch(batch(g, range(21, 41), ids))) for g in ("gw1", "gw2")]
        r2 = [await f for f in second]  # call 3 was refused by the server: again, call 4 in a savepoint
        assert [r.ack_seqs for r in r1 + r2] == [list(range(1, 21))] * 2 + [list(range(21, 41))] * 2
        assert all(len(r.new_events) == 20 and r.duplicates == 0 for r in r1 + r2)
        assert rows(pg_target, "SELECT gateway, count(*), min(seq), max(seq) FROM events GROUP BY 1 ORDER BY 1") == [
            ("gw1", 40, 1, 40),
            ("gw2", 40, 1, 40),
        ]
        assert rows(pg_target, "SELECT gateway, contiguous_seq, events_stored FROM gateways ORDER BY 1") == [
            ("gw1", 40, 40),
            ("gw2", 40, 40),
        ]
        got: list[str] = []
        gen = listener.notifies(timeout=2.0)
        async for n in gen:
            got.append(n.payload)
        assert got == ["call 2", "call 4"]  # the refused and the unsent ones: nothing; the committed: once each
    finally:
        await store.close()
        await listener.close()
