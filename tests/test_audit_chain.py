"""The audit trail as a hash chain on a real store, SQLite and PostgreSQL alike: rows written by the portal's own
actions (alarm workflow, arm commands, residents shown, registry views, door commands) through the store's single
writer verify intact; an edited field, a deleted middle row and a deleted last row are each found at the right row;
a store from before the chain is chained by the migration; ``python -m portal audit-verify`` exits 0, 1 or 2."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ulid import ULID

from gateway import wire
from portal.alarms import incidents as alarms
from portal.config import load
from portal.estate import registry as reg
from portal.store import SCHEMA_VERSION, Conn, Store, StoreBatch, Target, audit, connect, migrate
from portal.store.storekey import StoreKey
from tests.portal_support import GATEWAY, ROOT, SITE, store_key, write_config

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
ZONE = {
    "zone": "P1",
    "zone_type": "perimeter",
    "kind": "intrusion",
    "cause": "instant",
    "group": "perimeter",
    "incident": "I-1",
    "count": 1,
}


def alarm_event(seq: int) -> wire.Event:
    ts = T0 + timedelta(seconds=seq)
    return wire.Event(
        id=str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type="zone.alarm",
        device="fence-1",
        place=wire.Place(site=SITE, zone="P1"),
        point="in1",
        priority=wire.Priority.INTRUSION,
        data=dict(ZONE),
    )


async def fill(db: Target, key: StoreKey | None = None) -> int:
    """The portal's real actions on a real store; returns the number of audit rows they wrote."""
    store = Store(db, key=key or store_key(db))
    await store.start()
    try:
        await store.write(StoreBatch(wire.batch_events(SITE, GATEWAY, [alarm_event(1)])))
        res: alarms.FeedResult = await store.write(alarms.FeedIncidents(now="2026-03-01T08:00:30.000000Z"))
        [iid] = res.new_ids
        await store.write(alarms.IncidentAction(iid, "ack", "guard:bob"))
        await store.run_write(lambda c: alarms.audit_view(c, "guard:bob", iid, "127.0.0.1"))
        await store.write(alarms.IncidentAction(iid, "note", "guard:bob", text="fence checked, 说明"))
        await store.write(alarms.IncidentAction(iid, "resolve", "guard:bob", cause="false"))
        cmd = wire.Command(
            v=wire.SCHEMA_VERSION,
            id=str(ULID()),
            type="arm",
            ts=T0,
            expires=T0 + timedelta(seconds=30),
            by="guard:bob",
            args={"group": "perimeter", "mode": "away", "force": False},
        )
        await store.run_write(lambda c: alarms.record_command(c, cmd, SITE, GATEWAY))
        # Many writers at once (web views, door orders): the single writer chains them one after another.
        await asyncio.gather(
            *(
                store.run_write(
                    lambda c, i=i: reg.audit(c, "admin:alice", "view.house", f"house:{i}", "full", "10.0.0.9")
                )
                for i in range(20)
            )
        )
        await store.run_write(lambda c: audit.write(c, "guard:bob", "door.remote_unlock", "door:s1/d1", "delivery"))
        # A failing op rolls back its audit row and the anchor with it: the chain stays whole.

        def fails(c: Conn) -> None:
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


def check(db: Target) -> audit.Verdict:
    conn = connect(db)
    try:
        return audit.verify(conn, store_key(db))
    finally:
        conn.close()


def tamper(db: Target, sql: str, *args: object) -> None:
    """Plain SQL without the store key, as someone with the file or the database's password would do it."""
    conn = connect(db)
    try:
        assert conn.execute(sql, args).rowcount == 1
    finally:
        conn.close()


def ids(db: Target) -> list[int]:
    conn = connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM audit ORDER BY id")]
    finally:
        conn.close()


async def test_real_actions_chain_and_verify(store_target: Target) -> None:
    db = store_target
    n = await fill(db)
    conn = connect(db)
    try:
        actions = [r[0] for r in conn.execute("SELECT action FROM audit ORDER BY id")]
        rows = conn.execute("SELECT prev_hash, hash FROM audit ORDER BY id").fetchall()
        anchor = tuple(conn.execute("SELECT last_id, hash, count FROM audit_anchor").fetchone())
    finally:
        conn.close()
    assert actions[:5] == ["alarm.ack", "view.incident", "alarm.note", "alarm.resolve", "alarm.arm"]
    assert actions[5:] == ["view.house"] * 20 + ["door.remote_unlock"] and n == 26
    assert rows[0][0] == "" and all(rows[i][0] == rows[i - 1][1] for i in range(1, n))
    assert len({h for _, h in rows}) == n
    assert anchor == (ids(db)[-1], rows[-1][1], n)
    assert check(db) == audit.Verdict(True, n)


async def test_an_edited_field_is_found_at_its_row(store_target: Target) -> None:
    db = store_target
    n = await fill(db)
    target = ids(db)[7]
    tamper(db, "UPDATE audit SET actor = 'admin:mallory' WHERE id = ?", target)
    v = check(db)
    assert (v.ok, v.bad_id, v.rows) == (False, target, 7) and "edited" in v.reason
    assert n == 26


async def test_a_deleted_middle_row_is_found_at_the_next_row(store_target: Target) -> None:
    db = store_target
    await fill(db)
    all_ids = ids(db)
    tamper(db, "DELETE FROM audit WHERE id = ?", all_ids[10])
    v = check(db)
    assert (v.ok, v.bad_id) == (False, all_ids[11]) and "prev_hash" in v.reason and str(all_ids[9]) in v.reason


async def test_a_deleted_first_row_is_found(store_target: Target) -> None:
    db = store_target
    await fill(db)
    all_ids = ids(db)
    tamper(db, "DELETE FROM audit WHERE id = ?", all_ids[0])
    v = check(db)
    assert (v.ok, v.bad_id) == (False, all_ids[1]) and "start of the chain" in v.reason


async def test_a_deleted_last_row_is_found_by_the_anchor(store_target: Target) -> None:
    db = store_target
    n = await fill(db)
    last = ids(db)[-1]
    tamper(db, "DELETE FROM audit WHERE id = ?", last)
    v = check(db)
    assert (v.ok, v.bad_id, v.rows) == (False, last, n - 1) and "anchor" in v.reason
    # ... and a new row written after that does not hide the gap: its prev_hash is the anchor's.
    conn = connect(db, key=store_key(db))
    try:
        conn.begin()
        new_id = audit.write(conn, "admin:alice", "view.pending")
        conn.execute("COMMIT")
    finally:
        conn.close()
    assert new_id == last + 1
    v = check(db)
    assert (v.ok, v.bad_id) == (False, new_id) and "prev_hash" in v.reason


async def test_a_recomputed_row_without_its_successors_is_found(store_target: Target) -> None:
    """Editing a row and fixing its own hash (even with the store key) still breaks the next row's prev_hash."""
    db = store_target
    await fill(db)
    all_ids = ids(db)
    conn = connect(db)
    try:
        prev, rid, at, actor, action, target, _, remote = conn.execute(
            "SELECT prev_hash, id, at, actor, action, target, detail, remote FROM audit WHERE id = ?", (all_ids[3],)
        ).fetchone()
    finally:
        conn.close()
    forged = audit.keyed(store_key(db))(prev, rid, at, actor, action, target, "nothing to see", remote)
    tamper(db, "UPDATE audit SET detail = 'nothing to see', hash = ? WHERE id = ?", forged, rid)
    v = check(db)
    assert (v.ok, v.bad_id) == (False, all_ids[4]) and "prev_hash" in v.reason


def test_the_migration_chains_rows_written_before_it(tmp_path: Path) -> None:
    db = tmp_path / "portal.db"
    key = store_key(db)
    conn = connect(db, key=key)
    try:
        migrate(conn, upto=4)  # a store from before the chain
        for i in (1, 2, 5, 9):  # ids with gaps, as old deletes leave them
            conn.execute(
                "INSERT INTO audit (id, at, actor, action, target, detail, remote) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (i, f"2026-01-0{i}T00:00:00.000000Z", "admin:alice", "view.house", f"house:{i}", 'é\n"x"', ""),
            )
        assert migrate(conn) == SCHEMA_VERSION  # chained (5), then keyed with an audit.keyed row: id 10
        assert audit.verify(conn) == audit.Verdict(True, 5)
        conn.execute("BEGIN IMMEDIATE")
        assert audit.write(conn, "guard:bob", "view.incident", "incident:1") == 11
        conn.execute("COMMIT")
        assert audit.verify(conn) == audit.Verdict(True, 6)
        conn.execute("UPDATE audit SET target = 'house:3' WHERE id = 2")
        assert audit.verify(conn).bad_id == 2
    finally:
        conn.close()

    empty = connect(tmp_path / "empty.db")  # nothing to seal or chain: no key needed to create a store
    try:
        migrate(empty)
        assert audit.verify(empty, key) == audit.Verdict(True, 0)
        empty.execute("DELETE FROM audit_anchor")
        v = audit.verify(empty, key)
        assert not v.ok and "anchor" in v.reason
    finally:
        empty.close()


def cli(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portal", "audit-verify", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


async def test_the_cli_exit_codes(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, None)
    db = load(str(cfg)).db_path

    r = await asyncio.to_thread(cli, cfg)
    assert r.returncode == 2 and "no store" in r.stderr, r.stderr

    n = await fill(db, load(str(cfg)).store_key())  # the key file the portal of cfg uses
    r = await asyncio.to_thread(cli, cfg)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f'{{"ok": true, "rows": {n}, "bad_id": null, "reason": ""}}'

    target = ids(db)[5]
    tamper(db, "UPDATE audit SET detail = 'partial' WHERE id = ?", target)
    r = await asyncio.to_thread(cli, cfg)
    assert r.returncode == 1
    assert f"broken at row {target}: hash mismatch" in r.stderr, r.stderr


# ---------------------------------------------------------------- anchors kept elsewhere


def portal_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portal", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def rewrite(db: Path, key: StoreKey, edit: str, *args: object) -> None:
    """What someone who holds the store key as well can do: change the trail, then chain it all again with the key
    and set the anchor row to match, so that the chain on its own checks out."""
    conn = sqlite3.connect(db)
    mac = audit.keyed(key)
    try:
        with conn:
            conn.execute(edit, args)
            prev, n, last = "", 0, 0
            for rid, at, actor, action, target, detail, remote in conn.execute(
                "SELECT id, at, actor, action, target, detail, remote FROM audit ORDER BY id"
            ).fetchall():
                h = mac(prev, rid, at, actor, action, target, detail, remote)
                conn.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", (prev, h, rid))
                prev, n, last = h, n + 1, rid
            conn.execute("UPDATE audit_anchor SET last_id = ?, hash = ?, count = ?", (last, prev, n))
    finally:
        conn.close()


async def test_an_anchor_kept_elsewhere_finds_a_trail_rewritten_with_the_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, None)
    conf = load(str(cfg))
    db, key = conf.db_path, conf.store_key()
    await fill(db, key)
    elsewhere = tmp_path / "usb-stick"
    elsewhere.mkdir()
    first = elsewhere / "anchor-1.json"
    r = await asyncio.to_thread(portal_cli, "audit-anchor", "export", "--config", cfg, "-o", first)
    assert r.returncode == 0, r.stderr
    a1 = json.loads(first.read_text())
    assert a1["id"] == ids(db)[-1] and a1["store_key"] == key.fingerprint  # it pins its own export row too
    r = await asyncio.to_thread(portal_cli, "audit-anchor", "export", "--config", cfg)  # to stdout, e.g. for mail
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == a1["id"] + 1
    second = elsewhere / "anchor-2.json"
    second.write_text(r.stdout)
    conn = connect(db, key=key)  # the portal works on
    try:
        for i in range(3):
            conn.execute("BEGIN IMMEDIATE")
            audit.write(conn, "guard:bob", "view.incident", f"incident:{i}")
            conn.execute("COMMIT")
    finally:
        conn.close()
    r = await asyncio.to_thread(portal_cli, "audit-verify", "--config", cfg, "--anchor", first, "--anchor", second)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and [x["ok"] for x in out["anchors"]] == [True, True]
    conn = sqlite3.connect(db)
    try:
        exports = conn.execute("SELECT target FROM audit WHERE action = 'audit.anchor' ORDER BY id").fetchall()
    finally:
        conn.close()
    assert exports == [(str(first.resolve()),), ("stdout",)]

    # An insider with the key removes an early row (a door they opened) and chains everything again.
    victim = ids(db)[6]
    rewrite(db, key, "DELETE FROM audit WHERE id = ?", victim)
    r = await asyncio.to_thread(portal_cli, "audit-verify", "--config", cfg)
    assert r.returncode == 0, "the key alone cannot tell: this is what anchors are for"
    r = await asyncio.to_thread(portal_cli, "audit-verify", "--config", cfg, "--anchor", first)
    assert r.returncode == 1
    assert f"row {a1['id']} is not the row the anchor saw" in r.stderr, r.stderr
    assert json.loads(r.stdout)["anchors"][0]["ok"] is False

    # Or cuts the trail back to before the anchor's row.
    rewrite(db, key, "DELETE FROM audit WHERE id >= ?", a1["id"] - 3)
    r = await asyncio.to_thread(portal_cli, "audit-verify", "--config", cfg, "--anchor", second)
    assert r.returncode == 1 and f"before row {a1['id'] + 1} of the anchor" in r.stderr, r.stderr

    for bad, why in (("{}", "not an audit anchor"), ("not json", "not JSON")):
        junk = elsewhere / "junk.json"
        junk.write_text(bad)
        r = await asyncio.to_thread(portal_cli, "audit-verify", "--config", cfg, "--anchor", junk)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_anchor_older_than_what_retention_keeps_says_so(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, None)
    conf = load(str(cfg))
    conn = connect(conf.db_path, key=conf.store_key())
    try:
        migrate(conn)
        conn.execute("BEGIN IMMEDIATE")
        anchors = []
        for i in range(5):  # a year and more ago; anchors exported after the 3rd and the 5th row
            audit.write(conn, "admin:alice", "view.house", f"house:{i}", at=f"2020-01-0{i + 1}T00:00:00.000000Z")
            if i in (2, 4):
                anchors.append(audit.anchor(conn))
        audit.write(conn, "admin:alice", "view.house", "house:9")
        conn.execute("COMMIT")
    finally:
        conn.close()
    old, edge = tmp_path / "anchor-row-3.json", tmp_path / "anchor-row-5.json"
    old.write_text(anchors[0].text())
    edge.write_text(anchors[1].text())
    r = portal_cli("audit-verify", "--config", cfg, "--anchor", old, "--anchor", edge)
    assert r.returncode == 0, r.stderr
    r = portal_cli("purge", "--config", cfg)
    assert r.returncode == 0 and json.loads(r.stdout)["counts"]["audit"] == 5, r.stderr
    r = portal_cli("audit-verify", "--config", cfg, "--anchor", edge)  # its row is where the kept chain starts
    assert r.returncode == 0, r.stderr
    r = portal_cli("audit-verify", "--config", cfg, "--anchor", old)
    assert r.returncode == 1 and "was pruned by retention" in r.stderr and "exported since" in r.stderr, r.stderr
    assert json.loads(r.stdout)["rows"] == 2  # the chain itself is whole: the kept row and the purge's own row
