"""The incident feed passes routine events over in its query (portal.alarms.incidents._FEEDS_SQL): whatever it acts
on must still reach it, whatever made it an alarm, however many routine events came before."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from gateway import wire
from portal.alarms import incidents as alarms
from portal.store import Store, StoreBatch
from portal.store.writer import event_dict
from tests.portal_support import GATEWAY, SITE, store_key

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
P = wire.Priority


def ev(seq: int, type_: str, prio: int = 0, data: dict[str, Any] | None = None) -> wire.Event:
    ts = T0 + timedelta(seconds=seq)
    return wire.Event(
        id=str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type=type_,
        device="d1",
        place=wire.Place(site=SITE, zone="P1"),
        point="in1",
        priority=prio,
        data=data or {},
    )


#: one of each way an event becomes the feed's business (and routine ones around them)
KINDS: list[tuple[str, int, dict[str, Any]]] = [
    ("zone.alarm", P.INTRUSION, {"incident": "I-1", "count": 1}),
    ("house.sos", 0, {}),  # unpaired, at any priority
    ("panel.unknown_account", 0, {}),
    ("zone.restore", 0, {}),  # a restore type
    ("door.tamper_restore", 0, {}),  # any *_restore
    ("point.cleared", 0, {"how": "reset"}),  # a restore by its data
    ("device.fault", 0, {"incident": 7}),  # an engine incident at low priority
    ("command.rejected", P.TAMPER, {}),  # a security event among the command. ones
    ("site.power", P.TAMPER, {}),  # by priority alone
    ("group.armed", 0, {"group": "perimeter"}),
    ("command.result", 0, {"command_id": "c1", "ok": True}),
]
ROUTINE: list[tuple[str, int, dict[str, Any]]] = [
    ("test.synthetic", 0, {"n": 1}),
    ("door.state", 10, {"state": "open"}),
    ("command.ack", P.TAMPER, {}),  # command. and gateway. events are never alarms, whatever their priority
    ("house.armed", P.TAMPER, {}),
]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "portal.db", key=store_key(tmp_path / "portal.db"))
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def test_the_query_keeps_everything_the_feed_acts_on(store: Store) -> None:
    events = [ev(i + 1, t, p, d) for i, (t, p, d) in enumerate(KINDS + ROUTINE)]
    await store.write(StoreBatch(wire.batch_events(SITE, GATEWAY, events)))
    rows = await store.read(
        lambda c: c.execute(
            "SELECT id, site, gateway, seq, ts, type, device, point, priority, place, data, received_at FROM events"
        ).fetchall()
    )
    wanted = set()
    for r in rows:
        e = event_dict(tuple(r))
        if alarms.is_alarm(e) or e["type"].startswith("group.") or e["type"] == "command.result":
            wanted.add(e["id"])
    assert wanted == {e.id for e in events[: len(KINDS)]}  # the list above says what it means to
    kept = await store.read(lambda c: {r[0] for r in c.execute(f"SELECT id FROM events WHERE {alarms._FEEDS_SQL}")})
    assert wanted <= kept
    low = {e.id for e in events if e.priority < P.TAMPER and e.type in ("test.synthetic", "door.state")}
    assert len(low) == 2 and not kept & low  # and it does pass routine ones over


async def test_an_alarm_behind_thousands_of_routine_events_is_folded_by_one_feed(store: Store) -> None:
    routine = [ev(i, "test.synthetic", 0, {"n": i}) for i in range(1, alarms.FEED_CHUNK * 3)]
    sos = ev(alarms.FEED_CHUNK * 3, "house.sos", P.INTRUSION, {})
    for i in range(0, len(routine), 500):
        await store.write(StoreBatch(wire.batch_events(SITE, GATEWAY, routine[i : i + 500])))
    await store.write(StoreBatch(wire.batch_events(SITE, GATEWAY, [sos])))
    res: alarms.FeedResult = await store.write(alarms.FeedIncidents(now="2026-03-01T09:00:00.000000Z"))
    assert [i["type"] for i in res.incidents] == ["house.sos"] and not res.more
    top = await store.read(alarms.max_event_pk)
    assert res.last_pk == top == await store.read(alarms.feed_cursor)
    assert not await store.read(alarms.feed_pending)
