"""Retention of the gateway's event log on real SQLite files: acknowledged events past the age or row bound go,
in chunks, on the writer thread; an unacknowledged event never does, and the newest one always stays."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway import wire
from gateway.events import Draft
from gateway.store import Store

PLACE = wire.Place(site="s1", zone="z1")
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def _drafts(n: int, ts: datetime, start: int = 0) -> list[Draft]:
    return [Draft(type="zone.alarm", device="p1", place=PLACE, data={"n": start + i}, ts=ts) for i in range(n)]


def _seqs(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")]
    finally:
        conn.close()


async def _acked(store: Store, seqs: list[int]) -> None:
    store.acknowledge(seqs)
    await store.drain()


async def test_old_acknowledged_events_go_unacknowledged_and_recent_ones_stay(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    async with Store(path, site="s1", gateway="gw1", wall=lambda: NOW, retention_days=30, prune_every_s=3600) as store:
        old = await store.append(_drafts(10, NOW - timedelta(days=40)))  # seqs 1..10
        await store.append(_drafts(5, NOW - timedelta(days=1), 10))  # seqs 11..15
        await _acked(store, [e.seq for e in old if e.seq not in (3, 7)] + [11, 12])
        assert await store.prune_now() == 8
        # 3 and 7 are old but still in the outbox: the portal has not stored them yet.
        assert _seqs(path) == [3, 7, 11, 12, 13, 14, 15]
        assert await store.outbox_depth() == 5
        await _acked(store, [3, 7])
        assert await store.prune_now() == 2
        assert _seqs(path) == [11, 12, 13, 14, 15]
        assert store.pruned == 10


async def test_row_bound_keeps_the_newest_and_seqs_continue_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    async with Store(path, site="s1", gateway="gw1", wall=lambda: NOW, retention_rows=20, prune_every_s=3600) as store:
        evs = await store.append(_drafts(50, NOW))
        await _acked(store, [e.seq for e in evs])
        assert await store.prune_now() == 30
        assert _seqs(path) == list(range(31, 51))
    # Everything acknowledged and old: all but the newest event go, so the next seq is still known.
    async with Store(
        path, site="s1", gateway="gw1", wall=lambda: NOW + timedelta(days=400), retention_days=1, prune_every_s=3600
    ) as store:
        assert await store.prune_now() == 19
        assert _seqs(path) == [50]
        assert [e.seq for e in await store.append(_drafts(1, NOW))] == [51]


async def test_the_writer_prunes_in_small_chunks_while_idle(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    wall = [NOW]
    async with Store(
        path, site="s1", gateway="gw1", wall=lambda: wall[0], retention_days=1, prune_chunk=7, prune_every_s=0.05
    ) as store:
        evs = await store.append(_drafts(40, NOW))
        await _acked(store, [e.seq for e in evs[:30]])
        seen = await store.seen_command("cmd-1", NOW)
        assert not seen and await store.seen_command("cmd-1", NOW)
        loop = asyncio.get_running_loop()
        # One chunk deletes at most prune_chunk rows.
        wall[0] = NOW + timedelta(days=2)
        assert await loop.run_in_executor(store._executor, store._prune_chunk) == 7
        # The writer thread does the rest on its own, a chunk at a time, between writes.
        for _ in range(200):
            if store.pruned >= 30:
                break
            await asyncio.sleep(0.02)
        assert store.pruned == 30
        assert _seqs(path) == list(range(31, 41))
        # Writes still go through, and the command record (older than retention) was forgotten too.
        assert [e.seq for e in await store.append(_drafts(1, wall[0]))] == [41]
        assert not await store.seen_command("cmd-1", NOW)


async def test_no_retention_configured_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    async with Store(path, site="s1", gateway="gw1", wall=lambda: NOW, prune_every_s=0.01) as store:
        evs = await store.append(_drafts(10, NOW - timedelta(days=4000)))
        await _acked(store, [e.seq for e in evs])
        await asyncio.sleep(0.1)
        assert store.pruned == 0
    assert len(_seqs(path)) == 10
