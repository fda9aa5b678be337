"""A corrupt store file at start-up is moved aside and replaced, on real SQLite files and a real gateway process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway import config, wire
from gateway.app import Gateway
from gateway.credentials import open_access_db
from gateway.events import Draft
from gateway.store import MIGRATIONS, Store, StoreError, move_aside, open_db, replace_if_corrupt
from gateway.tooling.broker import MosquittoProcess
from gateway.wire.passes import generate_keypair, save_public_key
from tests import procs
from tests.portal_support import GATEWAY, SITE, mqtt, signed_command
from tests.waiting import wait_for

PLACE = wire.Place(site="s1", zone="z1")
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
MOVED = "gw.db.corrupt-20260102T030405Z"


async def _real_store(path: Path, n: int = 3000) -> int:
    """A store with ``n`` events (many pages), closed (so its WAL is checkpointed into the file); its size."""
    async with Store(path, site="s1", gateway="gw1") as store:
        for i in range(0, n, 500):
            await store.append(
                [
                    Draft(type="zone.alarm", device="p1", place=PLACE, data={"n": i + j, "pad": "x" * 200})
                    for j in range(500)
                ]
            )
    assert not Path(f"{path}-wal").exists()
    return path.stat().st_size


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(1).randbytes(64 * 1024))


async def _truncated(path: Path) -> None:
    size = await _real_store(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


async def _page_overwritten(path: Path) -> None:
    size = await _real_store(path)
    page = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    middle = (size // page // 2) * page
    with open(path, "r+b") as f:
        f.seek(middle)
        f.write(random.Random(2).randbytes(page))


async def _make(kind: str, path: Path) -> bytes:
    if kind == "random":
        _random_bytes(path)
    elif kind == "truncated":
        await _truncated(path)
    else:
        await _page_overwritten(path)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["random", "truncated", "page_overwritten"])
async def test_corrupt_store_is_moved_aside_and_replaced(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "gw.db"
    damaged = await _make(kind, path)
    async with Store(path, site="s1", gateway="gw1", wall=lambda: NOW) as store:
        assert store.replaced is not None
        assert store.replaced.path == path
        assert store.replaced.moved_to == tmp_path / MOVED
        assert store.replaced.error
        assert [e.seq for e in await store.append([Draft(type="zone.alarm", device="p1", place=PLACE)])] == [1]
        assert [e.seq for e in await store.events()] == [1]
    assert (tmp_path / MOVED).read_bytes() == damaged  # kept as it was, for whoever looks into it
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()
    async with Store(path, site="s1", gateway="gw1", wall=lambda: NOW) as store:  # the fresh file stays
        assert store.replaced is None
        assert await store.outbox_depth() == 1


async def test_sound_store_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    await _real_store(path, n=500)
    async with Store(path, site="s1", gateway="gw1") as store:
        assert store.replaced is None
        assert await store.outbox_depth() == 500
    assert [p.name for p in tmp_path.iterdir() if "corrupt" in p.name] == []


async def test_sidecars_move_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    _random_bytes(path)
    Path(f"{path}-wal").write_bytes(b"stale wal")
    Path(f"{path}-shm").write_bytes(b"stale shm")
    async with Store(path, site="s1", gateway="gw1", wall=lambda: NOW) as store:
        assert store.replaced is not None
    assert (tmp_path / f"{MOVED}-wal").read_bytes() == b"stale wal"
    assert (tmp_path / f"{MOVED}-shm").exists()  # SQLite rebuilds the shm index when it reads, so not its bytes


def test_second_move_in_the_same_second_gets_its_own_name(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    _random_bytes(path)
    first = move_aside(path, "bad", NOW)
    path.write_bytes(b"again")
    second = move_aside(path, "bad", NOW)
    assert first.moved_to.name == MOVED
    assert second.moved_to.name == f"{MOVED}.1"
    assert second.moved_to.read_bytes() == b"again" and not path.exists()


async def test_newer_schema_is_refused_not_moved(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    open_db(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        async with Store(path, site="s1", gateway="gw1"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1


def test_corrupt_access_db_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "access.db"
    _random_bytes(path)
    r = replace_if_corrupt(path, lambda: NOW)
    assert r is not None and r.moved_to == tmp_path / "access.db.corrupt-20260102T030405Z" and r.moved_to.exists()
    db = open_access_db(path)
    assert db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    db.conn.close()
    assert replace_if_corrupt(path) is None


def test_gateway_starts_on_a_corrupt_store(tmp_path: Path, broker: MosquittoProcess) -> None:
    data = tmp_path / "data"
    data.mkdir()
    store = data / "gateway.db"
    _random_bytes(store)
    damaged = store.read_bytes()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        f"""
site: s1
gateway: gw1
data_dir: {data}
mqtt: {{host: 127.0.0.1, port: {broker.port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}
""",
        encoding="utf-8",
    )
    gw = procs.gateway(cfg, tmp_path / "logs")
    try:
        gw.start(timeout=30)
        assert gw.alive
    finally:
        assert gw.stop() == 0, gw.tail()
    moved = [p for p in data.iterdir() if re.fullmatch(r"gateway\.db\.corrupt-\d{8}T\d{6}Z", p.name)]
    assert len(moved) == 1 and moved[0].read_bytes() == damaged
    assert "is corrupt" in gw.tail()
    conn = sqlite3.connect(store)
    rows = conn.execute("SELECT e.type, e.priority, e.body FROM outbox o JOIN events e ON e.seq = o.seq").fetchall()
    conn.close()
    faults = [json.loads(b) for t, p, b in rows if t == "store.corrupt_replaced"]
    assert len(faults) == 1
    assert faults[0]["priority"] == wire.Priority.FAULT
    assert faults[0]["data"]["moved_to"] == str(moved[0])
    assert faults[0]["data"]["error"]


async def test_a_gateway_whose_store_was_replaced_says_its_groups_are_disarmed(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """The perimeter is armed; the SD card then ruins the store. The gateway that starts on a fresh one has lost the
    arm state with everything else: its groups are disarmed, and it says so (group.disarmed, source "start") beside
    the fault, so the board does not go on showing armed a perimeter that alarms at nothing."""
    key, public = generate_keypair()
    save_public_key(tmp_path / "portal.pub.pem", public)
    data = tmp_path / "data"
    cfg_path = tmp_path / "gateway.yaml"
    cfg_path.write_text(
        f"""
site: {SITE}
gateway: {GATEWAY}
data_dir: {data}
access: {{public_keys: [portal.pub.pem]}}
mqtt: {{host: 127.0.0.1, port: {broker.port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}
zone_groups: [{{name: perimeter, label: 周界}}]
""",
        encoding="utf-8",
    )

    @contextlib.asynccontextmanager
    async def running() -> AsyncIterator[Gateway]:
        gw = Gateway(config.load(cfg_path))
        stop = asyncio.Event()
        runner = asyncio.create_task(gw.run(stop))
        try:
            await asyncio.wait_for(gw.ready.wait(), 20)
            yield gw
        finally:
            stop.set()
            await asyncio.wait_for(runner, 30)

    async with running() as gw, mqtt(broker) as portal:
        engine = gw.engine
        assert engine is not None

        async def armed() -> bool:  # sent until the gateway, subscribing as it connects, has it
            payload, _ = signed_command(key, "arm", group="perimeter", mode="away")
            await portal.publish(wire.topic(SITE, GATEWAY, "cmd"), payload, qos=1)
            await asyncio.sleep(0.3)
            return engine.group_states()["perimeter"]["state"] == "armed"

        await wait_for(armed, 15, "the perimeter armed")
        await asyncio.wait_for(gw.store.drain(), 10)
    store = data / "gateway.db"
    for extra in data.glob("gateway.db-*"):
        extra.unlink()
    _random_bytes(store)
    async with running() as gw:
        assert gw.engine is not None and gw.engine.group_states()["perimeter"]["state"] == "disarmed"
        evs = await wait_for(
            lambda: _types(gw, ("store.corrupt_replaced", "group.disarmed")), 10, "the fault and the disarmed group"
        )
        (said,) = [e for e in evs if e.type == "group.disarmed"]
        assert said.data["group"] == "perimeter" and said.data["source"] == "start" and said.data["by"] == "gateway"
        assert said.seq > next(e.seq for e in evs if e.type == "store.corrupt_replaced")


async def _types(gw: Gateway, types: tuple[str, ...]) -> list[wire.Event] | None:
    evs = [e for e in await gw.store.events() if e.type in types]
    return evs if {e.type for e in evs} == set(types) else None
