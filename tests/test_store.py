"""The gateway's local store on real SQLite files: seqs without gaps, one transaction, full disk."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway import wire
from gateway.events import Draft
from gateway.store import ACK_DELAY_S, JOURNAL_KEEP, JOURNAL_SUFFIX, MIGRATIONS, Store, StoreError, open_db
from tests.waiting import wait_for

PLACE = wire.Place(site="s1", zone="z1")


def _drafts(n: int, start: int = 0) -> list[Draft]:
    return [Draft(type="zone.alarm", device="p1", place=PLACE, data={"n": start + i}) for i in range(n)]


async def test_seq_has_no_gaps_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    async with Store(path, site="s1", gateway="gw1") as store:
        futs = [store.submit(_drafts(3, i * 3)) for i in range(10)]
        events = [e for f in futs for e in await f]
        assert [e.seq for e in events] == list(range(1, 31))
        assert len({e.id for e in events}) == 30
        assert await store.outbox_depth() == 30
    async with Store(path, site="s1", gateway="gw1") as store:
        more = await store.append(_drafts(2))
        assert [e.seq for e in more] == [31, 32]
        assert [e.data["n"] for e in await store.events(after_seq=29)] == [29, 0, 1]
        # ids are time-ordered: sorting by id gives seq order
        evs = await store.events()
        assert sorted(evs, key=lambda e: e.id) == evs


async def test_the_urgent_journal_starts_over_once_committed_past_its_size(tmp_path: Path) -> None:
    """Alarms handed to the uplink before their commit are journaled first; a gateway that runs for years must not grow
    that journal for ever: once everything in it is committed and it has passed JOURNAL_KEEP, it starts over."""
    path = tmp_path / "gw.db"
    journal = Path(str(path) + JOURNAL_SUFFIX)
    handed: list[int] = []
    pad = "x" * 4000
    n = 3 * JOURNAL_KEEP // (2 * len(pad))  # 1.5 x JOURNAL_KEEP in all: one truncation due, not a second
    async with Store(path, site="s1", gateway="gw1") as store:
        store.on_urgent = lambda rows: handed.extend(seq for seq, _ in rows) or True
        for i in range(n):
            data = {"n": i, "pad": pad}
            await store.append(
                [Draft(type="zone.alarm", device="p1", place=PLACE, priority=wire.Priority.INTRUSION, data=data)]
            )
        assert handed == list(range(1, n + 1))  # every alarm went out before its commit, so through the journal
        # Started over (in the journal's own thread, a moment after the commit that found it due), not grown on.
        await wait_for(lambda: journal.stat().st_size < JOURNAL_KEEP, 5, "the journal started over")
        assert await store.event_count() == n


async def test_event_outbox_and_state_in_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    async with Store(path, site="s1", gateway="gw1") as store:
        await store.append(_drafts(2), state={"engine": {"armed": ["g1"]}})
        assert await store.get_state("engine") == {"armed": ["g1"]}
        store.acknowledge([1])
        await store.append([])
        assert await store.outbox_depth() == 1
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 2  # the log keeps acknowledged events
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()


async def test_an_ack_taken_during_a_stalled_commit_is_committed_after_it_or_rides_the_next(tmp_path: Path) -> None:
    """Acks wait for no timer of their own while a commit is under way or queued (an alarm's ack rides the commit of
    the alarms after it); but an ack that came during the last commit, with nothing queued after it, must still be
    committed within ACK_DELAY_S of that commit, not left in memory until some later alarm."""
    stall = 0.4
    async with Store(tmp_path / "gw.db", site="s1", gateway="gw1", stall=lambda: stall) as store:
        first = store.submit(_drafts(1))  # seq 1: its commit stalls
        await asyncio.sleep(0.1)
        store.acknowledge([1])  # during that commit, nothing queued: after it, within ACK_DELAY_S
        await first
        t0 = asyncio.get_running_loop().time()

        async def acked() -> bool:
            return await store.outbox_depth() == 0

        await wait_for(acked, 5, "the ack's commit")
        # (the ack's own commit stalls too: its wait is ACK_DELAY_S and a stall)
        assert asyncio.get_running_loop().time() - t0 < ACK_DELAY_S + stall + 1.0
        stall = 0.4
        second = store.submit(_drafts(1, 1))  # seq 2: its commit stalls; seq 3 queued behind it
        await asyncio.sleep(0.1)
        third = store.submit(_drafts(1, 2))
        store.acknowledge([2])  # rides seq 3's commit
        await second
        await third
        assert await store.outbox_depth() == 1  # seq 3 only: no wait for a timer


def test_schema_v1_is_the_one_sqlite_utils_made(tmp_path: Path) -> None:
    """The released step 1, now plain SQL (the daemon no longer loads sqlite-utils), makes the same schema, word
    for word, as sqlite-utils made when it was released."""
    import sqlite_utils

    db = sqlite_utils.Database(sqlite3.connect(":memory:"))
    db["events"].create(
        {"seq": int, "id": str, "ts": str, "type": str, "priority": int, "body": bytes},
        pk="seq",
        not_null={"id", "ts", "type", "body"},
    )
    db["events"].create_index(["id"], unique=True)
    db["events"].create_index(["ts"])
    db["outbox"].create({"seq": int}, pk="seq", foreign_keys=[("seq", "events", "seq")])
    db["state"].create({"key": str, "value": bytes}, pk="key")
    db["commands_seen"].create({"id": str, "ts": str}, pk="id")
    conn = open_db(tmp_path / "gw.db")
    schema = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
    assert conn.execute(schema).fetchall() == db.conn.execute(schema).fetchall()
    conn.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    open_db(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        open_db(path)


async def test_full_disk_keeps_events_in_memory_until_space_returns(tmp_path: Path) -> None:
    """SQLite's own 'database or disk is full' (max_page_count) stands in for a full SD card."""
    path = tmp_path / "gw.db"
    faults: list[str | None] = []
    async with Store(path, site="s1", gateway="gw1") as store:
        store.on_fault = faults.append
        await store.append(_drafts(1))
        conn = await asyncio.get_running_loop().run_in_executor(store._executor, store._conn)
        pages = await asyncio.get_running_loop().run_in_executor(
            store._executor, lambda: conn.execute("PRAGMA page_count").fetchone()[0]
        )
        await asyncio.get_running_loop().run_in_executor(
            store._executor, lambda: conn.execute(f"PRAGMA max_page_count={pages}")
        )
        big = [Draft(type="zone.alarm", device="p1", place=PLACE, data={"pad": "x" * 2000, "n": i}) for i in range(200)]
        fut = store.submit(big)
        for _ in range(200):
            if store.fault:
                break
            await asyncio.sleep(0.01)
        assert store.fault and "full" in store.fault
        assert not fut.done()
        await asyncio.get_running_loop().run_in_executor(
            store._executor, lambda: conn.execute("PRAGMA max_page_count=1073741823")
        )
        events = await asyncio.wait_for(fut, 10)
        assert [e.seq for e in events] == list(range(2, 202))
        assert store.fault is None
        assert faults[0] and faults[-1] is None


async def test_backlog_is_bounded(tmp_path: Path) -> None:
    async with Store(tmp_path / "gw.db", site="s1", gateway="gw1", ring_max=10) as store:
        ok = store.submit(_drafts(8))
        refused = store.submit(_drafts(5))
        # an alarm is never refused for lack of room (nor the routine events in the same transaction)
        alarm = Draft(type="zone.alarm", device="p1", place=wire.Place(site="s1"), priority=wire.Priority.INTRUSION)
        taken = store.submit([*_drafts(3), alarm])
        with pytest.raises(StoreError, match="backlog"):
            await refused
        assert len(await ok) == 8
        assert [e.type for e in await taken][-1] == "zone.alarm"
        assert store.dropped == 5
