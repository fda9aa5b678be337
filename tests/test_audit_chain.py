"""The audit trail as a hash chain on a real SQLite store: rows written by the portal's own actions (alarm
workflow, arm commands, residents shown, registry views, door commands) through the store's single writer verify
intact; an edited field, a deleted middle row and a deleted last row are each found at the right row; a store
from before the chain is chained by the migration; ``python -m portal audit-verify`` exits 0, 1 or 2."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ulid import ULID

from gateway import wire
from portal import alarms, audit
from portal import registry as reg
from portal.config import load
from portal.store import MIGRATIONS, Store, StoreBatch, audit_hash, connect, migrate
from tests.portal_support import GATEWAY, ROOT, SITE, write_config

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
ZONE = {"zone": "P1", "zone_type": "perimeter", "kind": "intrusion", "cause": "instant", "group": "perimeter",
        "incident": "I-1", "count": 1}


def alarm_event(seq: int) -> wire.Event:
    ts = T0 + timedelta(seconds=seq)
    return wire.Event(id=str(ULID.from_datetime(ts)), seq=seq, ts=ts, type="zone.alarm", device="fence-1",
                      place=wire.Place(site=SITE, zone="P1"), point="in1", priority=wire.Priority.INTRUSION,
                      data=dict(ZONE))


async def fill(db: Path) -> int:
    """The portal's real actions on a real store; returns the number of audit rows they wrote."""
    store = Store(db)
    await store.start()
    try:
        await store.write(StoreBatch(wire.batch_events(SITE, GATEWAY, [alarm_event(1)])))
        res: alarms.FeedResult = await store.write(alarms.FeedIncidents(now="2026-03-01T08:00:30.000000Z"))
        [iid] = res.new_ids
        await store.write(alarms.IncidentAction(iid, "ack", "guard:bob"))
        await store.run_write(lambda c: alarms.audit_view(c, "guard:bob", iid, "127.0.0.1"))
        await store.write(alarms.IncidentAction(iid, "note", "guard:bob", text="fence checked, 说明"))
        await store.write(alarms.IncidentAction(iid, "resolve", "guard:bob", cause="false"))
        cmd = wire.Command(v=wire.SCHEMA_VERSION, id=str(ULID()), type="arm", ts=T0, expires=T0 + timedelta(seconds=30),
                           by="guard:bob", args={"group": "perimeter", "mode": "away", "force": False})
        await store.run_write(lambda c: alarms.record_command(c, cmd, SITE, GATEWAY))
        # Many writers at once (web views, door orders): the single writer chains them one after another.
        await asyncio.gather(*(
            store.run_write(lambda c, i=i: reg.audit(c, "admin:alice", "view.house", f"house:{i}", "full", "10.0.0.9"))
            for i in range(20)))
        await store.run_write(lambda c: audit.write(c, "guard:bob", "door.remote_unlock", "door:s1/d1", "delivery"))
        # A failing op rolls back its audit row and the anchor with it: the chain stays whole.

        def fails(c: sqlite3.Connection) -> None:
            audit.write(c, "guard:bob", "view.house", "house:99")
            raise ValueError("refused")

        try:
            await store.run_write(fails)
        except ValueError:
            pass
        else:
            raise AssertionError("the failing op did not fail")
        return int(await store.read(lambda c: c.execute("SELECT count(*) FROM audit").fetchone()[0]))
    finally:
        await store.close()


def check(db: Path) -> audit.Verdict:
    conn = sqlite3.connect(db)
    try:
        return audit.verify(conn)
    finally:
        conn.close()


def tamper(db: Path, sql: str, *args: object) -> None:
    """Plain sqlite3, as someone with the file would do it."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            assert conn.execute(sql, args).rowcount == 1
    finally:
        conn.close()


def ids(db: Path) -> list[int]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM audit ORDER BY id")]
    finally:
        conn.close()


async def test_real_actions_chain_and_verify(tmp_path: Path) -> None:
    db = tmp_path / "portal.db"
    n = await fill(db)
    conn = sqlite3.connect(db)
    try:
        actions = [r[0] for r in conn.execute("SELECT action FROM audit ORDER BY id")]
        rows = conn.execute("SELECT prev_hash, hash FROM audit ORDER BY id").fetchall()
        anchor = conn.execute("SELECT last_id, hash, count FROM audit_anchor").fetchone()
    finally:
        conn.close()
    assert actions[:5] == ["alarm.ack", "view.incident", "alarm.note", "alarm.resolve", "alarm.arm"]
    assert actions[5:] == ["view.house"] * 20 + ["door.remote_unlock"] and n == 26
    assert rows[0][0] == "" and all(rows[i][0] == rows[i - 1][1] for i in range(1, n))
    assert len({h for _, h in rows}) == n
    assert anchor == (ids(db)[-1], rows[-1][1], n)
    assert check(db) == audit.Verdict(True, n)


async def test_an_edited_field_is_found_at_its_row(tmp_path: Path) -> None:
    db = tmp_path / "portal.db"
    n = await fill(db)
    target = ids(db)[7]
    tamper(db, "UPDATE audit SET actor = 'admin:mallory' WHERE id = ?", target)
    v = check(db)
    assert (v.ok, v.bad_id, v.rows) == (False, target, 7) and "edited" in v.reason
    assert n == 26


async def test_a_deleted_middle_row_is_found_at_the_next_row(tmp_path: Path) -> None:
    db = tmp_path / "portal.db"
    await fill(db)
    all_ids = ids(db)
    tamper(db, "DELETE FROM audit WHERE id = ?", all_ids[10])
    v = check(db)
    assert (v.ok, v.bad_id) == (False, all_ids[11]) and "prev_hash" in v.reason and str(all_ids[9]) in v.reason


async def test_a_deleted_first_row_is_found(tmp_path: Path) -> None:
    db = tmp_path / "portal.db"
    await fill(db)
    all_ids = ids(db)
    tamper(db, "DELETE FROM audit WHERE id = ?", all_ids[0])
    v = check(db)
    assert (v.ok, v.bad_id) == (False, all_ids[1]) and "start of the chain" in v.reason


async def test_a_deleted_last_row_is_found_by_the_anchor(tmp_path: Path) -> None:
    db = tmp_path / "portal.db"
    n = await fill(db)
    last = ids(db)[-1]
    tamper(db, "DELETE FROM audit WHERE id = ?", last)
    v = check(db)
    assert (v.ok, v.bad_id, v.rows) == (False, last, n - 1) and "anchor" in v.reason
    # ... and a new row written after that does not hide the gap: its prev_hash is the anchor's.
    conn = connect(db)
    try:
        conn.execute("BEGIN IMMEDIATE")
        new_id = audit.write(conn, "admin:alice", "view.pending")
        conn.execute("COMMIT")
    finally:
        conn.close()
    assert new_id == last + 1
    v = check(db)
    assert (v.ok, v.bad_id) == (False, new_id) and "prev_hash" in v.reason


async def test_a_recomputed_row_without_its_successors_is_found(tmp_path: Path) -> None:
    """Editing a row and fixing its own hash still breaks the next row's prev_hash."""
    db = tmp_path / "portal.db"
    await fill(db)
    all_ids = ids(db)
    conn = sqlite3.connect(db)
    try:
        prev, rid, at, actor, action, target, _, remote = conn.execute(
            "SELECT prev_hash, id, at, actor, action, target, detail, remote FROM audit WHERE id = ?",
            (all_ids[3],)).fetchone()
    finally:
        conn.close()
    forged = audit_hash(prev, rid, at, actor, action, target, "nothing to see", remote)
    tamper(db, "UPDATE audit SET detail = 'nothing to see', hash = ? WHERE id = ?", forged, rid)
    v = check(db)
    assert (v.ok, v.bad_id) == (False, all_ids[4]) and "prev_hash" in v.reason


def test_the_migration_chains_rows_written_before_it(tmp_path: Path) -> None:
    db = tmp_path / "portal.db"
    conn = connect(db)
    try:
        for n, sql in enumerate(MIGRATIONS[:4], start=1):  # a store from before the chain
            conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {n};\nCOMMIT;")
        for i in (1, 2, 5, 9):  # ids with gaps, as old deletes leave them
            conn.execute("INSERT INTO audit (id, at, actor, action, target, detail, remote)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (i, f"2026-01-0{i}T00:00:00.000000Z", "admin:alice", "view.house", f"house:{i}",
                          "é\n\"x\"", ""))
        assert migrate(conn) == len(MIGRATIONS)
        assert audit.verify(conn) == audit.Verdict(True, 4)
        conn.execute("BEGIN IMMEDIATE")
        assert audit.write(conn, "guard:bob", "view.incident", "incident:1") == 10
        conn.execute("COMMIT")
        assert audit.verify(conn) == audit.Verdict(True, 5)
        conn.execute("UPDATE audit SET target = 'house:3' WHERE id = 2")
        assert audit.verify(conn).bad_id == 2
    finally:
        conn.close()

    empty = connect(tmp_path / "empty.db")
    try:
        migrate(empty)
        assert audit.verify(empty) == audit.Verdict(True, 0)
        empty.execute("DELETE FROM audit_anchor")
        v = audit.verify(empty)
        assert not v.ok and "anchor" in v.reason
    finally:
        empty.close()


def cli(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "portal", "audit-verify", "--config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


async def test_the_cli_exit_codes(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, None)
    db = load(str(cfg)).db_path

    r = await asyncio.to_thread(cli, cfg)
    assert r.returncode == 2 and "no store" in r.stderr, r.stderr

    n = await fill(db)
    r = await asyncio.to_thread(cli, cfg)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f'{{"ok": true, "rows": {n}, "bad_id": null, "reason": ""}}'

    target = ids(db)[5]
    tamper(db, "UPDATE audit SET detail = 'partial' WHERE id = ?", target)
    r = await asyncio.to_thread(cli, cfg)
    assert r.returncode == 1
    assert f"broken at row {target}: hash mismatch" in r.stderr, r.stderr
