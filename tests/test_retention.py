"""Data retention on real SQLite files with a fixed ``now``: in every table rows past the policy go and younger ones
stay; security logs under six months are refused by the config and by the policy; a former resident's name and
phone are anonymised N days after the move-out while residencies, passes and the access log still point at the row
("former resident", no dangling foreign key); the audit chain verifies after pruning and still finds an edited, a
deleted or a truncated kept row and a forged start; a dry run changes nothing; ``python -m portal purge`` works on a
real file; 50,000 rows go in chunks while the store's other writers wait well under a second; the portal runs a
purge by itself after start-up."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from ulid import ULID

from gateway import wire
from portal.config import ConfigError, load, parse
from portal.doors.access_log import names_of
from portal.estate import registry as reg
from portal.estate.retention import FORMER_RESIDENT, Policy, _Run, purge, purge_store
from portal.store import (
    Conn,
    FnOp,
    Store,
    StoreBatch,
    Target,
    Tx,
    audit,
    connect,
    db,
    insert_user,
    open_db,
    ts_text,
)
from portal.store.storekey import StoreKey
from tests.portal_support import GATEWAY, ROOT, SITE, running_portal, store_key, wait_for, write_config

NOW = datetime.now(UTC).replace(microsecond=0)
TZ = ZoneInfo("Asia/Shanghai")
TODAY = NOW.astimezone(TZ).date()


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def at(days: float) -> str:
    return ts_text(ago(days))


def unix(days: float) -> int:
    return int(ago(days).timestamp())


def day(days: int) -> str:
    return (TODAY - timedelta(days=days)).isoformat()


def tx(conn: Conn, fn: Callable[[Conn], Any]) -> Any:
    conn.begin()
    try:
        out = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return out


def one(conn: Conn, sql: str, *args: Any) -> Any:
    row = conn.execute(sql, args).fetchone()
    return None if row is None else row[0]


def rows(conn: Conn, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(sql, args)]


def column(conn: Conn, sql: str, *args: Any) -> list[Any]:
    return [r[0] for r in conn.execute(sql, args)]


# ---------------------------------------------------------------- seeding through the portal's own code


PEOPLE_CSV = (
    "site,site_name,building,unit,house,name,phone,role,move_in,move_out,lease_end\n"
    f"s1,阳光花园,3,2,301,搬走甲,13800000001,owner,2020-01-01,{day(31)},\n"  # moved out 31 days ago: purged
    f"s1,阳光花园,3,2,302,搬走乙,13800000002,owner,2020-01-01,{day(10)},\n"  # 10 days ago: kept
    f"s1,阳光花园,3,2,301,换房丙,13800000003,owner,2020-01-01,{day(100)},\n"  # left 301 ...
    "s1,阳光花园,3,2,302,换房丙,13800000003,family,2020-01-01,,\n"  # ... but lives in 302: kept
    "s1,阳光花园,3,2,302,住户丁,13800000004,owner,2020-01-01,,\n"  # current: kept
    "s1,阳光花园,3,2,303,,,,,,\n"
)


def access_event(seq: int, ts: datetime, subject: str, *, gateway_type: str = "access.granted") -> wire.Event:
    return wire.Event(
        id=str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type=gateway_type,
        device="door-1",
        place=wire.Place(site=SITE, building="3", unit="2", door="d1"),
        point="r1",
        priority=wire.Priority.ROUTINE,
        data={"subject": subject, "house": "3-2-301", "kind": "resident", "reader": "r1"},
    )


def alarm_event(seq: int, ts: datetime) -> wire.Event:
    return wire.Event(
        id=str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type="zone.alarm",
        device="fence-1",
        place=wire.Place(site=SITE, zone="P1"),
        point="in1",
        priority=wire.Priority.INTRUSION,
        data={"zone": "P1"},
    )


def store_events(conn: Conn, events: list[wire.Event], gateway: str = GATEWAY) -> None:
    """Through the store's own op (its triggers fill the access log), in one transaction."""
    tx(conn, lambda c: StoreBatch(wire.batch_events(SITE, gateway, events)).apply(Tx(c, {})))


def person_id(conn: Conn, phone: str) -> int:
    return int(one(conn, "SELECT id FROM reg_people WHERE phone = ?", phone))


def subject_of(conn: Conn, phone: str, house: str) -> str:
    return str(
        one(
            conn,
            "SELECT r.subject FROM reg_residents r JOIN reg_people p ON p.id = r.person_id"
            " JOIN reg_houses h ON h.id = r.house_id WHERE p.phone = ? AND h.code = ?",
            phone,
            house,
        )
    )


def seed(conn: Conn) -> dict[str, Any]:
    """One row past the policy and one within it in every table the purge touches (defaults: 365 days for the
    security logs, 30 for former residents and visitor names, 90 for work items)."""

    def old_audit(c: Conn) -> None:  # the trail is written in time order: a year old first
        for i in range(5):
            audit.write(c, "admin:alice", "view.house", f"house:{i}", "", "10.0.0.9", at=at(400 - i))

    tx(conn, old_audit)
    imported, errors = reg.parse_import(PEOPLE_CSV.encode())
    assert not errors, errors
    tx(conn, lambda c: reg.apply_import(c, imported, "admin:alice"))
    house = int(one(conn, "SELECT id FROM reg_houses WHERE code = '301'"))
    gone, stays = person_id(conn, "13800000001"), person_id(conn, "13800000004")
    gone_res = int(one(conn, "SELECT id FROM reg_residents WHERE person_id = ?", gone))
    gone_subject = subject_of(conn, "13800000001", "301")

    def more(c: Conn) -> None:
        # a registration rejected 40 days ago (purged) and one pending since long ago (kept)
        rej = reg.register(c, house, "13800000005", "被拒戊", "owner", None, None)
        c.execute("UPDATE reg_residents SET status = 'rejected', decided_at = ? WHERE id = ?", (at(40), rej))
        pend = reg.register(c, house, "13800000006", "待审己", "owner", None, None)
        c.execute("UPDATE reg_residents SET created_at = ? WHERE id = ?", (at(400), pend))
        # sign-in: staff sessions, residents' phone sessions, one-time codes
        uid = insert_user(c, "alice", "admin", "x", False)
        now_s = NOW.timestamp()
        c.executemany(
            "INSERT INTO sessions (id_hash, user_id, csrf_token, created, last_seen) VALUES (?, ?, '', ?, ?)",
            [
                ("s-idle", uid, now_s - 7200, now_s - 7200),
                ("s-old", uid, now_s - 13 * 3600, now_s - 60),
                ("s-live", uid, now_s - 600, now_s - 60),
            ],
        )
        c.executemany(
            "INSERT INTO resident_sessions (id_hash, person_id, created, last_seen) VALUES (?, ?, ?, ?)",
            [
                ("r-idle", stays, now_s - 20 * 86400, now_s - 15 * 86400),
                ("r-live", stays, now_s - 86400, now_s - 60),
                ("r-gone", gone, now_s - 86400, now_s - 60),
            ],
        )
        c.execute("UPDATE reg_people SET otc_hash = 'h1', otc_expires = ? WHERE id = ?", (now_s - 10, stays))
        c.execute("UPDATE reg_people SET otc_hash = 'h2', otc_expires = ? WHERE phone = '13800000002'", (now_s + 3600,))
        # work items: finished long ago (anonymised), open long ago and finished lately (kept)
        notes = json.dumps([{"at": at(95), "by": "guard:bob", "status": "closed", "note": "回电 13912345678"}])
        for text, status, updated in (
            ("漏水，请联系 13912345678", "closed", at(95)),
            ("门锁坏了", "open", at(200)),
            ("电梯异响", "resolved", at(10)),
        ):
            c.execute(
                "INSERT INTO work_items (kind, house_id, text, photo, photo_type, status, notes, created_at,"
                " updated_at) VALUES ('problem', ?, ?, ?, 'image/jpeg', ?, ?, ?, ?)",
                (house, text, b"\xff\xd8\xff", status, notes, updated, updated),
            )
        # visitors at the guardroom: expired a year ago (deleted), 40 days ago (name cleared), 5 days ago (kept)
        for subj, name, expired in (("v:old", "访客甲", 400), ("v:mid", "访客乙", 40), ("v:new", "访客丙", 5)):
            c.execute(
                "INSERT INTO guard_visitors (subject, name, site, building, unit, house, house_id, pass_id,"
                " sealed, not_before, not_after, uses, note, created_at, created_by) VALUES"
                " (?, ?, 's1', '3', '2', '301', ?, 'aa', 'QR', ?, ?, 1, '手机 139', ?, 'guard:bob')",
                (subj, name, house, unix(expired + 1), unix(expired), at(expired + 1)),
            )
        # visitor passes residents issued: one expired a year ago (deleted) and one by the former resident (kept)
        for token, expired in (("t-old", 400), ("t-gone", 20)):
            c.execute(
                "INSERT INTO visitor_passes (token_hash, resident_id, pass_id, subject, sealed, not_before,"
                " not_after, uses, created_at) VALUES (?, ?, 'bb', 'v:x', 'QR', ?, ?, 1, ?)",
                (token, gone_res, unix(expired + 1), unix(expired), at(expired + 1)),
            )
        # incidents: closed a year ago with its log (deleted); open since a year ago and closed lately (kept)
        for key, state, created, closed in (
            ("I-old", "closed", 400, 399),
            ("I-open", "new", 400, None),
            ("I-new", "closed", 30, 29),
        ):
            iid = c.execute(
                "INSERT INTO incidents (key, site, gateway, kind, type, priority, place, first_event, opened_at,"
                " created_at, last_event_at, state, closed_at, updated_at) VALUES (?, 's1', 'gw1', 'intrusion',"
                " 'zone.alarm', 3, '{}', 'e', ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    key,
                    at(created),
                    at(created),
                    at(created),
                    state,
                    at(closed) if closed else None,
                    at(closed or created),
                ),
            ).fetchone()[0]
            c.executemany(
                "INSERT INTO incident_log (incident_id, at, actor, action) VALUES (?, ?, 'guard:bob', ?)",
                [(iid, at(created), a) for a in ("alarm", "ack", "close")],
            )
        for cid, sent in (("c-old", 400), ("c-new", 100)):
            c.execute(
                "INSERT INTO door_commands (id, site, gateway, door, reason, by_user, sent_at, status)"
                " VALUES (?, 's1', 'gw1', 'd1', '送快递', 'guard:bob', ?, 'opened')",
                (cid, at(sent)),
            )
            c.execute(
                "INSERT INTO console_commands (id, site, gateway, type, args, by_user, sent_at, status)"
                " VALUES (?, 's1', 'gw1', 'arm', '{}', 'guard:bob', ?, 'ok')",
                (cid, at(sent)),
            )
        for i in range(3):
            audit.write(c, "guard:bob", "signin", "guard:bob", "", "10.0.0.8", at=at(100 - i))

    tx(conn, more)
    # events: a year-old access and alarm (deleted), recent ones (kept); the former resident's door opening lately
    store_events(
        conn,
        [
            access_event(1, ago(400), gone_subject),
            alarm_event(2, ago(399)),
            access_event(3, ago(100), gone_subject),
            alarm_event(4, ago(99)),
        ],
    )
    store_events(conn, [alarm_event(1, ago(500))], gateway="gw2")  # a gateway's newest event stays, however old
    return {"gone": gone, "stays": stays, "gone_subject": gone_subject, "house": house}


EXPECTED = {
    "sessions": 2,
    "resident_sessions": 1,
    "signin_codes": 1,
    "former_residents": 2,
    "work_items": 1,
    "visitor_names": 2,
    "guard_visitors": 1,
    "visitor_passes": 1,
    "access_log": 1,
    "events": 2,
    "incident_log": 3,
    "incidents": 1,
    "door_commands": 1,
    "console_commands": 1,
    "care_contacts": 0,
    "care_alerts": 0,
    "patrol_visits": 0,
    "patrol_scans": 0,
    "patrol_rounds": 0,
    "audit": 5,
}


NewStore = Callable[[str], Target]


def fresh(new_store: NewStore, name: str = "portal.db", key: StoreKey | None = None) -> tuple[Conn, dict[str, Any]]:
    target = new_store(name)
    conn = open_db(target, key or store_key(target))
    return conn, seed(conn)


def broken_references(conn: Conn) -> list[tuple[Any, ...]]:
    """SQLite's check of the foreign keys (PostgreSQL refuses a broken one at the statement)."""
    return rows(conn, "PRAGMA foreign_key_check") if db.dialect_of(conn) == db.SQLITE else []


def snapshot(conn: Conn) -> dict[str, list[tuple[Any, ...]]]:
    tables = column(
        conn,
        "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name"
        if db.dialect_of(conn) == db.SQLITE
        else "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    return {t: [tuple(r) for r in conn.execute(f"SELECT * FROM {t} ORDER BY 1")] for t in tables}


# ---------------------------------------------------------------- the policy in the config


@pytest.mark.parametrize("key", ["audit_days", "access_log_days", "events_days", "incidents_days", "commands_days"])
def test_config_refuses_security_logs_under_six_months(tmp_path: Path, key: str) -> None:
    path = tmp_path / "portal.yaml"
    text = f"site_name: x\nretention:\n  former_residents_days: 0\n  {key}: 182\n"
    with pytest.raises(ConfigError) as e:
        parse(path, text)
    assert e.value.problems == [f"{path}:4: {key} is 182, but security logs are kept at least 183 days (six months)"]
    assert parse(path, text.replace("182", "183")).retention.__getattribute__(key) == 183
    with pytest.raises(ValueError, match="at least 183"):
        Policy(**{key: 100})


def test_config_section_is_strict_and_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    path = tmp_path / "portal.yaml"
    with pytest.raises(ConfigError) as e:
        parse(path, "retention:\n  audit_days: 400\n  keep_forever: true\n")
    assert e.value.problems[0].startswith(f"{path}:3: ") and "keep_forever" in e.value.problems[0]
    with pytest.raises(ConfigError) as e:
        parse(path, "retention:\n  visitors_days: -1\n")
    assert e.value.problems[0].startswith(f"{path}:2: ")
    p = Policy.from_config(parse(path, "sessions: {idle_timeout_s: 600}\n"))
    assert (
        p.audit_days,
        p.access_log_days,
        p.events_days,
        p.former_residents_days,
        p.visitors_days,
        p.work_items_days,
        p.session_idle_s,
        p.chunk_rows,
    ) == (365, 365, 365, 30, 30, 90, 600, 2000)
    doc = (ROOT / "docs" / "retention.md").read_text(encoding="utf-8")
    for k in (
        "audit_days",
        "access_log_days",
        "events_days",
        "incidents_days",
        "commands_days",
        "former_residents_days",
        "visitors_days",
        "work_items_days",
        "start_delay_s",
        "chunk_rows",
    ):
        assert f"`{k}`" in doc, k


# ---------------------------------------------------------------- what goes and what stays


def test_each_table_old_rows_go_young_rows_stay(new_store: NewStore) -> None:
    conn, _ = fresh(new_store)
    try:
        rep = purge(conn, Policy(), NOW)
        assert rep.counts == EXPECTED and not rep.dry_run
        assert column(conn, "SELECT id_hash FROM sessions ORDER BY 1") == ["s-live"]
        assert column(conn, "SELECT id_hash FROM resident_sessions ORDER BY 1") == ["r-live"]  # r-gone: purged person
        assert rows(conn, "SELECT otc_hash FROM reg_people WHERE otc_expires IS NOT NULL") == [("h2",)]
        items = rows(conn, "SELECT status, text, photo IS NULL, notes FROM work_items ORDER BY id")
        assert items[0] == (
            "closed",
            "",
            1,
            json.dumps([{"at": at(95), "by": "guard:bob", "status": "closed", "note": ""}]),
        )
        assert [tuple(r)[:3] for r in items[1:]] == [("open", "门锁坏了", 0), ("resolved", "电梯异响", 0)]
        assert rows(conn, "SELECT subject, name, note FROM guard_visitors ORDER BY id") == [
            ("v:mid", "", ""),
            ("v:new", "访客丙", "手机 139"),
        ]
        assert column(conn, "SELECT token_hash FROM visitor_passes") == ["t-gone"]
        assert column(conn, "SELECT ts FROM access_log") == [at(100)]
        assert rows(conn, "SELECT gateway, seq FROM events ORDER BY gateway, seq") == [
            ("gw1", 3),
            ("gw1", 4),
            ("gw2", 1),
        ]
        assert column(conn, "SELECT key FROM incidents ORDER BY id") == ["I-open", "I-new"]
        assert one(conn, "SELECT count(*) FROM incident_log") == 6
        assert (
            column(conn, "SELECT id FROM door_commands") == column(conn, "SELECT id FROM console_commands") == ["c-new"]
        )
        kept = rows(conn, "SELECT action, at FROM audit ORDER BY id")
        assert [a for a, _ in kept] == [
            "import.csv",
            "register.request",
            "register.request",
            "signin",
            "signin",
            "signin",
            "retention.purge",
        ]
        assert all(t >= at(365) for _, t in kept)
        assert audit.verify(conn) == audit.Verdict(True, 7)
        row = conn.execute("SELECT actor, target, detail FROM audit WHERE action = 'retention.purge'").fetchone()
        assert row[0] == "system:retention" and row[1].startswith("audit-epoch:")
        assert json.loads(row[2]) == EXPECTED
        assert broken_references(conn) == []
        # a second run the same day finds nothing more (its own audit row is the only change)
        again = purge(conn, Policy(), NOW)
        assert sum(again.counts.values()) == 0 and audit.verify(conn).ok
    finally:
        conn.close()


def test_a_moved_out_resident_is_anonymised_after_n_days_and_history_stays_consistent(new_store: NewStore) -> None:
    conn, s = fresh(new_store)
    try:
        rejected = person_id(conn, "13800000005")
        purge(conn, Policy(former_residents_days=30), NOW)
        people = {
            r[0]: tuple(r)[1:]
            for r in conn.execute("SELECT id, name, phone, password_hash, purged_at IS NOT NULL FROM reg_people")
        }
        gone = s["gone"]
        assert people[gone] == (FORMER_RESIDENT, f"purged:{gone}", None, 1)
        assert people[rejected] == (FORMER_RESIDENT, f"purged:{rejected}", None, 1)
        names = sorted(n for n, *_ in people.values())
        assert names == sorted([FORMER_RESIDENT, FORMER_RESIDENT, "搬走乙", "换房丙", "住户丁", "待审己"])
        assert reg.person_by_phone(conn, "13800000001") is None  # the old phone signs nobody in
        # the residency, its pass subject and the access log still point at the person: shown as former resident
        assert one(conn, "SELECT count(*) FROM reg_residents WHERE person_id = ?", gone) == 1
        assert names_of(conn, {s["gone_subject"]}) == {s["gone_subject"]: FORMER_RESIDENT}
        assert one(conn, "SELECT count(*) FROM access_log WHERE subject = ?", s["gone_subject"]) == 1
        assert one(conn, "SELECT count(*) FROM visitor_passes WHERE token_hash = 't-gone'") == 1
        assert broken_references(conn) == []
    finally:
        conn.close()
    conn2, _ = fresh(new_store, "day29.db")  # with 32 days, 31 days after the move-out is too early
    try:
        rep = purge(conn2, Policy(former_residents_days=32), NOW)
        assert rep.counts["former_residents"] == 1  # only the registration rejected 40 days ago
        assert one(conn2, "SELECT name FROM reg_people WHERE phone = '13800000001'") == "搬走甲"
    finally:
        conn2.close()


def test_access_events_stay_as_long_as_the_access_log(new_store: NewStore) -> None:
    """events_days shorter than access_log_days: alarm events go, access events stay with their log rows."""
    conn, _ = fresh(new_store)
    try:
        rep = purge(conn, Policy(events_days=200, access_log_days=450), NOW)
        assert rep.counts["access_log"] == 0 and rep.counts["events"] == 1
        assert rows(conn, "SELECT gateway, seq FROM events ORDER BY gateway, seq") == [
            ("gw1", 1),
            ("gw1", 3),
            ("gw1", 4),
            ("gw2", 1),
        ]
    finally:
        conn.close()


def test_a_dry_run_changes_nothing_and_counts_what_a_run_does(new_store: NewStore) -> None:
    conn, _ = fresh(new_store)
    try:
        before = snapshot(conn)
        rep = purge(conn, Policy(), NOW, dry_run=True)
        assert rep.dry_run and rep.counts == EXPECTED and rep.audit_id is None
        assert snapshot(conn) == before
    finally:
        conn.close()


# ---------------------------------------------------------------- the audit chain after pruning


def chain(new_store: NewStore, name: str, old: int = 230, young: int = 20) -> Conn:
    target = new_store(name)
    conn = open_db(target, store_key(target))

    def fill(c: Conn) -> None:
        for i in range(old):
            audit.write(c, "admin:alice", "view.house", f"house:{i}", "", "", at=at(400 - i / 100))
        for i in range(young):
            audit.write(c, "guard:bob", "signin", "guard:bob", "", "", at=at(100 - i / 100))

    tx(conn, fill)
    return conn


def kept_ids(conn: Conn) -> list[int]:
    return column(conn, "SELECT id FROM audit ORDER BY id")


def test_audit_verifies_after_pruning_and_still_finds_tampering(new_store: NewStore) -> None:
    conn = chain(new_store, "a.db")
    try:
        rep = purge(conn, Policy(chunk_rows=100), NOW)
        assert rep.counts["audit"] == 230
        ep = audit.epoch(conn)
        assert (ep.through_id, ep.pruned) == (230, 230) and kept_ids(conn)[0] == 231
        assert audit.verify(conn) == audit.Verdict(True, 21)
        # a month later the next run moves the start again, past the first run's own row
        later = purge(conn, Policy(audit_days=183), NOW + timedelta(days=30))
        assert later.counts["audit"] == 0  # the signins are 70 days old then, the purge row 30
        assert audit.verify(conn) == audit.Verdict(True, 22)
        final = purge(conn, Policy(audit_days=183), NOW + timedelta(days=200))
        assert final.counts["audit"] == 22 and audit.verify(conn) == audit.Verdict(True, 1)
        conn.execute("UPDATE audit SET detail = '{}' WHERE id = ?", (kept_ids(conn)[0],))
        v = audit.verify(conn)
        assert (v.ok, v.bad_id) == (False, kept_ids(conn)[0]) and "edited" in v.reason
    finally:
        conn.close()

    def pruned(name: str) -> Conn:
        c = chain(new_store, name)
        purge(c, Policy(chunk_rows=100), NOW)
        for i in range(3):
            tx(c, lambda c, i=i: audit.write(c, "guard:bob", "view.incident", f"incident:{i}"))
        assert audit.verify(c).ok
        return c

    c = pruned("edit.db")  # an edited kept row
    target = kept_ids(c)[5]
    c.execute("UPDATE audit SET actor = 'admin:mallory' WHERE id = ?", (target,))
    v = audit.verify(c)
    assert (v.ok, v.bad_id, v.rows) == (False, target, 5) and "edited" in v.reason
    c.close()

    c = pruned("delete.db")  # a deleted kept row in the middle
    ids = kept_ids(c)
    c.execute("DELETE FROM audit WHERE id = ?", (ids[7],))
    v = audit.verify(c)
    assert (v.ok, v.bad_id) == (False, ids[8]) and "prev_hash" in v.reason
    c.close()

    c = pruned("first.db")  # the first kept row deleted: the start no longer matches the epoch
    ids = kept_ids(c)
    c.execute("DELETE FROM audit WHERE id = ?", (ids[0],))
    v = audit.verify(c)
    assert (v.ok, v.bad_id) == (False, ids[1]) and "start of the chain" in v.reason
    c.close()

    c = pruned("forged.db")  # ... and the epoch forged to hide it: the retention.purge row disagrees
    ids = kept_ids(c)
    h = one(c, "SELECT hash FROM audit WHERE id = ?", ids[0])
    c.execute("DELETE FROM audit WHERE id = ?", (ids[0],))
    c.execute("UPDATE audit_epoch SET through_id = ?, hash = ?, pruned = pruned + 1", (ids[0], h))
    v = audit.verify(c)
    assert not v.ok and "retention.purge" in v.reason, v
    c.close()

    c = pruned("tail.db")  # the newest row deleted: the anchor notices
    ids = kept_ids(c)
    c.execute("DELETE FROM audit WHERE id = ?", (ids[-1],))
    v = audit.verify(c)
    assert (v.ok, v.bad_id) == (False, ids[-1]) and "anchor" in v.reason
    c.close()

    c = pruned("unattested.db")  # rows pruned with no retention.purge row saying so
    tx(c, lambda c: audit.prune(c, audit.Epoch(240, "", 0), 100))
    v = audit.verify(c)
    assert not v.ok and "retention.purge" in v.reason, v
    c.close()

    c = pruned("dropped.db")  # the epoch row removed: the chain's first row no longer starts from nothing
    c.execute("DELETE FROM audit_epoch")
    v = audit.verify(c)
    assert not v.ok and "start of the chain" in v.reason
    c.close()


def test_an_interrupted_audit_prune_verifies_and_the_next_run_finishes_it(new_store: NewStore) -> None:
    conn = chain(new_store, "a.db")
    try:
        upto, planned, _ = tx(conn, lambda c: audit.claim(c, "system:retention", at(365), lambda n: f'{{"audit":{n}}}'))
        assert planned == 230
        assert tx(conn, lambda c: audit.prune(c, upto, 100)) == 100  # then the power went
        assert audit.verify(conn) == audit.Verdict(True, 151)
        rep = purge(conn, Policy(), NOW)
        assert rep.counts["audit"] == 130 and audit.verify(conn) == audit.Verdict(True, 22)
    finally:
        conn.close()


class _Chunks:
    """One retention run driven by hand, one chunk (one transaction) at a time, as a store's writer runs it."""

    def __init__(self, conn: Conn, now: datetime, name: str) -> None:
        self.conn = conn
        self.run = _Run(Policy(chunk_rows=100), now, dry_run=False, actor=f"system:retention@{name}")
        self.script = self.run.script()
        self.fn: Callable[[Conn], Any] | None = next(self.script)
        self.claimed = False

    def step(self) -> None:
        assert self.fn is not None
        result = tx(self.conn, self.fn)
        self.claimed = self.claimed or (isinstance(result, tuple) and isinstance(result[0], audit.Epoch))
        try:
            self.fn = self.script.send(result)
        except StopIteration:
            self.fn = None

    def until_claimed(self) -> None:
        while not self.claimed:
            self.step()

    def finish(self) -> None:
        while self.fn is not None:
            self.step()


@pytest.mark.parametrize("first", ["later cut", "earlier cut"])
def test_overlapping_runs_of_two_instances_leave_the_chain_verified(new_store: NewStore, first: str) -> None:
    """Two instances' daily runs on one store, their chunks taking turns: B's run started a minute before A's (or
    B's clock is a minute behind), so B's cut is earlier. Whichever claims first, and with one run pruning between
    the other's claim and its own, the chain verifies and every row older than the later cut is gone."""
    target = new_store("portal.db")
    key = store_key(target)
    a, b = open_db(target, key), open_db(target, key)
    try:
        cut = NOW - timedelta(days=365)

        def fill(c: Conn) -> None:  # a row a second around the year-old mark, then ten of yesterday
            for i in range(600):
                audit.write(c, "guard:bob", "signin", "guard:bob", at=ts_text(cut + timedelta(seconds=i - 300)))
            for i in range(10):
                audit.write(c, "guard:bob", "signin", "guard:bob", at=at(1 - i / 86400))

        tx(a, fill)
        runs = {"A": _Chunks(a, NOW, "A"), "B": _Chunks(b, NOW - timedelta(seconds=60), "B")}
        one_, other = (runs["A"], runs["B"]) if first == "later cut" else (runs["B"], runs["A"])
        one_.until_claimed()
        one_.step()  # its first chunk of the audit pruned
        other.until_claimed()
        one_.finish()
        other.finish()
        assert audit.verify(a).ok, audit.verify(a)
        assert one(a, "SELECT count(*) FROM audit WHERE at < ?", ts_text(cut)) == 0
        assert audit.epoch(a).pruned == 300
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- on the command line, in the portal


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portal", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


async def test_the_purge_command_on_a_real_file(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, None, extra="retention:\n  former_residents_days: 30\n  chunk_rows: 100\n")
    r = await asyncio.to_thread(cli, "purge", "--config", str(cfg))
    assert r.returncode == 2 and "no store" in r.stderr, r.stderr
    db = load(cfg).db_path
    conn, _ = fresh(lambda name: db, key=load(cfg).store_key())  # the key file the portal of cfg uses
    conn.close()
    before = (db.stat().st_size, snapshot_file(db))
    r = await asyncio.to_thread(cli, "purge", "--config", str(cfg), "--dry-run")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dry_run"] and out["counts"] == EXPECTED
    assert snapshot_file(db) == before[1]
    r = await asyncio.to_thread(cli, "purge", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["counts"] == EXPECTED and out["transactions"] >= len(EXPECTED)
    conn = connect(db)
    try:
        actor, detail = conn.execute("SELECT actor, detail FROM audit WHERE action = 'retention.purge'").fetchone()
    finally:
        conn.close()
    assert actor.startswith("cli:") and json.loads(detail) == EXPECTED
    r = await asyncio.to_thread(cli, "audit-verify", "--config", str(cfg))
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stderr
    bad = write_config(tmp_path / "bad", None, extra="retention:\n  access_log_days: 90\n")
    r = await asyncio.to_thread(cli, "purge", "--config", str(bad))
    assert r.returncode == 2 and f"{bad}:" in r.stderr and "at least 183 days" in r.stderr, r.stderr


def snapshot_file(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(db)
    try:
        return snapshot(conn)
    finally:
        conn.close()


async def test_the_portal_purges_after_start_up(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, None, extra="retention:\n  start_delay_s: 0.2\n")
    db = load(cfg).db_path
    conn = open_db(db)
    store_events(conn, [alarm_event(1, ago(400)), alarm_event(2, ago(1))])
    conn.close()
    async with running_portal(cfg) as p:

        def done(c: Conn) -> Any:
            return c.execute("SELECT actor, detail FROM audit WHERE action = 'retention.purge'").fetchone()

        row = await wait_for(lambda: p.services.store.read(done), timeout=20, what="the start-up purge")
    assert row[0] == "system:retention" and json.loads(row[1])["events"] == 1


# ---------------------------------------------------------------- chunks: nobody waits long


N_BULK = 50_000


@pytest.fixture(scope="module")
def bulk_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with 50,000 year-old access events (and their access-log rows), made once and copied per test."""
    db = tmp_path_factory.mktemp("bulk") / "portal.db"
    conn = open_db(db)
    try:
        tx(
            conn,
            lambda c: c.executemany(
                "INSERT INTO events (id, site, gateway, seq, ts, type, device, place, data, priority, received_at)"
                " VALUES (?, 's1', 'gw1', ?, ?, 'access.granted', 'door-1', '{\"site\":\"s1\",\"door\":\"d1\"}',"
                ' \'{"subject":"r:x","house":"3-2-301"}\', 1, ?)',
                (
                    (str(ULID.from_datetime(ago(400))), i, ts_text(ago(400) + timedelta(seconds=i)), at(400))
                    for i in range(1, N_BULK + 1)
                ),
            ),
        )
        assert one(conn, "SELECT count(*) FROM access_log") == N_BULK
    finally:
        conn.close()  # the last connection checkpoints the WAL: the file alone is the store
    return db


def copy_of(src: Path, folder: Path) -> Path:
    db = folder / "portal.db"
    shutil.copyfile(src, db)
    return db


@pytest.mark.realtime
@pytest.mark.slow  # fifty thousand rows: not in `make check`
async def test_fifty_thousand_rows_go_in_chunks_while_the_portal_writes_on(bulk_db: Path, tmp_path: Path) -> None:
    """The daily run: chunks are ops on the store's writer, between the other writers' ops."""
    db = copy_of(bulk_db, tmp_path)
    store = Store(db, key=store_key(db))
    await store.start()
    waits: list[float] = []
    stop = asyncio.Event()

    async def writer() -> None:  # the ingest and the web, meanwhile
        i = 0
        while not stop.is_set():
            t0 = time.monotonic()
            await store.write(FnOp(lambda c, i=i: audit.write(c, "guard:bob", "view.incident", f"incident:{i}")))
            waits.append(time.monotonic() - t0)
            i += 1
            await asyncio.sleep(0.01)

    try:
        task = asyncio.create_task(writer(), name="test.writer")
        rep = await purge_store(store, Policy(), NOW)
        stop.set()
        await task
        left = await store.read(
            lambda c: (one(c, "SELECT count(*) FROM events"), one(c, "SELECT count(*) FROM access_log"))
        )
        verdict = await store.read(audit.verify)
    finally:
        await store.close()
    print(
        f"\nstore: 50,000 access events: {rep.transactions} chunks, {rep.seconds:.2f} s, longest chunk"
        f" {rep.longest_chunk_s * 1000:.0f} ms; {len(waits)} concurrent writes, longest wait"
        f" {max(waits) * 1000:.0f} ms"
    )
    assert rep.counts["access_log"] == N_BULK and rep.counts["events"] == N_BULK - 1 and left == (1, 0)
    assert rep.transactions >= 50  # 25 chunks of 2,000 for each table
    assert len(waits) >= 5 and max(waits) < 1.0
    assert verdict.ok


@pytest.mark.realtime
@pytest.mark.slow  # fifty thousand rows: not in `make check`
def test_fifty_thousand_rows_from_the_command_line_beside_a_running_portal(bulk_db: Path, tmp_path: Path) -> None:
    """``python -m portal purge``'s path: its own connection; another connection's writes still get in."""
    db = copy_of(bulk_db, tmp_path)
    done = threading.Event()
    waits: list[float] = []
    errors: list[BaseException] = []

    def other_writer() -> None:
        conn = connect(db, key=store_key(db))
        try:
            while not done.is_set():
                t0 = time.monotonic()
                tx(conn, lambda c: audit.write(c, "guard:bob", "view.pending"))
                waits.append(time.monotonic() - t0)
                time.sleep(0.01)
        except BaseException as e:
            errors.append(e)
        finally:
            conn.close()

    conn = connect(db, key=store_key(db))
    t = threading.Thread(target=other_writer, name="test.other-writer")
    t.start()
    try:
        rep = purge(conn, Policy(), NOW)
    finally:
        done.set()
        t.join(timeout=30)
        conn.close()
    print(
        f"\ncli: 50,000 access events: {rep.transactions} chunks, {rep.seconds:.2f} s, longest chunk"
        f" {rep.longest_chunk_s * 1000:.0f} ms; {len(waits)} concurrent writes, longest wait"
        f" {max(waits) * 1000:.0f} ms"
    )
    assert not errors and not t.is_alive()
    assert rep.counts["access_log"] == N_BULK and rep.counts["events"] == N_BULK - 1
    assert rep.transactions >= 50 and len(waits) >= 5 and max(waits) < 1.0


# ---------------------------------------------------------------- care and patrols


def test_care_and_patrol_records_go_with_their_purposes(tmp_path: Path) -> None:
    """An ended care household's contact and who was cared for go 30 days after the end (the consent record and
    the alerts' history stay); a year-old care alert goes with its closed incident, never while it is open; patrol
    scans, visits and rounds are security logs kept as long as the access log."""
    from portal.alarms import incidents as alarms
    from portal.care import model as care_model
    from portal.care import watch as care_watch
    from portal.patrol import model as patrol_model

    conn = open_db(tmp_path / "portal.db", store_key(tmp_path / "portal.db"))
    imported, errors = reg.parse_import(PEOPLE_CSV.encode())
    assert not errors, errors
    tx(conn, lambda c: reg.apply_import(c, imported, "admin:alice"))
    owner = person_id(conn, "13800000004")
    houses = {code: int(one(conn, "SELECT id FROM reg_houses WHERE code = ?", code)) for code in ("301", "302", "303")}

    def care(c: sqlite3.Connection) -> dict[str, int]:
        ids = {}
        for code, ended in (("301", None), ("302", 10), ("303", 40)):
            s = care_model.Settings(
                (owner,), f"联系{code}", "女儿", "13655556666", 24, False, "00:00", "05:00", "本人", "written", at(500)
            )
            ids[code] = care_model.enrol(c, houses[code], SITE, s, "admin:alice", at(500))
            if ended is not None:
                care_model.end(c, ids[code], "admin:alice", at(ended))
        for code in ("303", "302"):  # year-old alerts: 303's closed below, 302's still open
            h = care_model.household(c, ids[code])
            assert h is not None
            care_watch.raise_alert(c, h, "no_activity", at(400), {"hours": 24})
        alarms.feed(c, now=at(400))
        iid = int(
            one(
                c,
                "SELECT k.incident_id FROM care_alerts a JOIN incident_keys k ON k.key = a.incident_key"
                " WHERE a.care_id = ?",
                ids["303"],
            )
        )
        alarms.settle(c, iid, "admin:alice", "false", "checked", now=at(399))
        return ids

    ids = tx(conn, care)

    def patrol(c: sqlite3.Connection) -> None:
        cp = patrol_model.add_checkpoint(c, SITE, "北门", "admin:alice", at(500))
        form = patrol_model.RouteForm("全天", "00:00", "23:59", 60, 30, 30, False, "", True, (cp.id,))
        patrol_model.save_route(c, None, SITE, form, "admin:alice", at(500))
        for days, nonce in ((400, "old"), (10, "young")):
            patrol_model.scan(c, cp, "bob", nonce, ago(days), TZ)

    tx(conn, patrol)
    rep = purge(conn, Policy(), NOW)
    assert (rep.counts["care_contacts"], rep.counts["care_alerts"]) == (1, 1)
    assert (rep.counts["patrol_visits"], rep.counts["patrol_scans"]) == (1, 1)
    assert (
        rep.counts["patrol_rounds"] >= 1
        and one(conn, "SELECT count(*) FROM patrol_rounds WHERE late_at < ?", at(365)) == 0
    )
    contacts = {
        code: rows(
            conn,
            "SELECT contact_name, contact_phone, consent_by, consent_how FROM care_households WHERE id = ?",
            ids[code],
        )[0]
        for code in ids
    }
    assert contacts["303"] == ("", "", "本人", "written")
    assert contacts["302"][:2] == ("联系302", "13655556666") and contacts["301"][:2] == ("联系301", "13655556666")
    assert column(conn, "SELECT care_id FROM care_people ORDER BY care_id") == [ids["301"], ids["302"]]
    assert column(conn, "SELECT care_id FROM care_alerts") == [ids["302"]]  # its incident is still open
    assert column(conn, "SELECT nonce FROM patrol_scans") == ["young"]
    assert one(conn, "SELECT count(*) FROM patrol_visits") == 1
    assert one(conn, "SELECT count(*) FROM patrol_rounds WHERE round_at = (SELECT round_at FROM patrol_visits)") == 1
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()
