"""The portal's store on both engines: one schema history that ends at the same schema, the same behaviour, the SQL
facade's tokenizer, the PostgreSQL database's checks, and two writer processes on one PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from gateway import wire
from portal.alarms import incidents as alarms
from portal.config import load
from portal.store import (
    SCHEMA_VERSION,
    EventQuery,
    Postgres,
    Store,
    StoreBatch,
    StoreError,
    connect,
    db,
    migrate,
    open_db,
    schema_version,
)
from portal.store import schema as store_schema
from portal.store.engine import placeholders
from tests.pg_support import PostgresServer
from tests.portal_support import ROOT, store_key, write_config
from tests.store_schema_support import describe

SITE, GATEWAY = "s1", "gw1"
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


# ---------------------------------------------------------------- the SQL both engines read


@pytest.mark.parametrize(
    ("sql", "out", "n"),
    [
        ("SELECT ? , ?", "SELECT %s , %s", 2),
        ("SELECT 'a?b' || ?", "SELECT 'a?b' || %s", 1),
        ("SELECT 'it''s ?' WHERE x = ?", "SELECT 'it''s ?' WHERE x = %s", 1),
        ('SELECT "odd?name" FROM t WHERE y = ?', 'SELECT "odd?name" FROM t WHERE y = %s', 1),
        ("SELECT 1 -- what? \nWHERE z = ?", "SELECT 1 -- what? \nWHERE z = %s", 1),
        ("SELECT /* a ? b */ ?", "SELECT /* a ? b */ %s", 1),
        ("SELECT $$ ? $$, $fn$ ' ? $fn$, ?", "SELECT $$ ? $$, $fn$ ' ? $fn$, %s", 1),
        ("SELECT x LIKE 'a%' AND y = ?", "SELECT x LIKE 'a%%' AND y = %s", 1),
        ("SELECT 5 % 2", "SELECT 5 %% 2", 0),
        ("SELECT E'\\'?' , ?", "SELECT E'\\'?' , %s", 1),  # E'...': a backslash escapes the quote
        ("SELECT name' ?'", "SELECT name' ?'", 0),  # a quote after a name ending in e is a plain literal
    ],
)
def test_placeholders_are_found_outside_literals_identifiers_and_comments(sql: str, out: str, n: int) -> None:
    assert placeholders(sql) == (out, n)


async def test_the_same_sql_gives_the_same_rows_on_both(store_target: Path | Postgres, tmp_path: Path) -> None:
    conn = open_db(store_target)
    try:
        conn.execute(
            "INSERT INTO rejections (reason, source, count, first_at, last_at) VALUES (?, ?, ?, ?, ?)",
            ("bad '?' frame", "s1/gw1", 3, "2026-01-01T00:00:00.000000Z", "2026-01-02T00:00:00.000000Z"),
        )
        row = conn.execute(
            "SELECT reason, count, count * 2 AS twice FROM rejections WHERE source = ?", ("s1/gw1",)
        ).fetchone()
        assert (row[0], row["count"], row["twice"]) == ("bad '?' frame", 3, 6)
        assert dict(zip(row.keys(), tuple(row), strict=True)) == {"reason": "bad '?' frame", "count": 3, "twice": 6}
        new = conn.execute(
            "INSERT INTO users (name, role, password_hash, created_at) VALUES (?, 'guard', 'x', ?) RETURNING id",
            ("Bob", "2026-01-01"),
        ).fetchone()[0]
        assert conn.execute("SELECT id FROM users WHERE name = ?", ("bOB",)).fetchone()[0] == new  # NOCASE/citext
        with pytest.raises(db.IntegrityError):
            conn.execute("INSERT INTO users (name, role, password_hash, created_at) VALUES ('BOB', 'guard', 'x', '')")
        assert (
            conn.execute(
                "INSERT INTO users (name, role, password_hash, created_at) VALUES ('bob', 'guard', 'x',"
                " '') ON CONFLICT DO NOTHING"
            ).rowcount
            == 0
        )
        ids = [new, 10_000]
        assert [
            r[0]
            for r in conn.execute(f"SELECT name FROM users WHERE {db.in_values(conn, 'id')}", (db.values(conn, ids),))
        ] == ["Bob"]
        assert conn.execute("SELECT greatest(?, 7, NULL), least('b', ?)", (3, "a")).fetchone()[:] == (7, "a")
        conn.execute(
            "INSERT INTO events (id, site, gateway, seq, ts, type, device, priority, place, data,"
            " received_at) VALUES ('e1', 's1', 'gw1', 1, 't', 'x', 'd', 1, ?, '{}', 't')",
            (json.dumps({"building": "3", "unit": "2"}),),
        )
        assert conn.execute(f"SELECT {db.json_field(conn, 'place', 'unit')} FROM events").fetchone()[0] == "2"
        with pytest.raises(ValueError, match="plain JSON key"):
            db.json_field(conn, "place", "a'); DROP TABLE events; --")
    finally:
        conn.close()


# ---------------------------------------------------------------- one schema history


def test_the_steps_are_numbered_without_holes_and_both_engines_end_at_the_same_version() -> None:
    sqlite_steps, pg_steps = store_schema.steps(db.SQLITE), store_schema.steps(db.POSTGRESQL)
    assert [s.version for s in sqlite_steps] == list(range(1, SCHEMA_VERSION + 1))
    assert pg_steps[0].baseline and pg_steps[-1].version == SCHEMA_VERSION
    assert [s.version for s in pg_steps] == list(range(pg_steps[0].version, SCHEMA_VERSION + 1))


def test_a_hole_or_a_double_in_the_steps_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for d in ("sqlite", "postgresql"):
        (tmp_path / d).mkdir()
    (tmp_path / "0001_core.sql").write_text("CREATE TABLE a (x INTEGER);")
    (tmp_path / "0003_more.sql").write_text("CREATE TABLE b (x INTEGER);")
    monkeypatch.setattr(store_schema, "MIGRATIONS_DIR", tmp_path)
    store_schema.steps.cache_clear()
    try:
        with pytest.raises(StoreError, match=r"lack \[2\]"):
            store_schema.steps(db.SQLITE)
        (tmp_path / "0002_x.sql").write_text("")
        (tmp_path / "sqlite" / "0002_y.sql").write_text("")
        with pytest.raises(StoreError, match="step 2 twice"):
            store_schema.steps(db.SQLITE)
        (tmp_path / "sqlite" / "0002_y.sql").unlink()
        assert [s.name for s in store_schema.steps(db.POSTGRESQL)] == ["core", "x", "more"]  # common to both
    finally:
        store_schema.steps.cache_clear()


def test_both_engines_end_at_the_same_schema(tmp_path: Path, pg_target: Postgres) -> None:
    lite, pg = open_db(tmp_path / "portal.db"), open_db(pg_target)
    try:
        a, b = describe(lite), describe(pg)
        assert sorted(a) == sorted(b)
        for table in a:
            for part in ("columns", "pk", "unique", "fks", "checks", "indexes"):
                assert a[table][part] == b[table][part], f"{table}.{part}"
        assert schema_version(lite) == schema_version(pg) == SCHEMA_VERSION
        # what the steps put in as well as made: the feed's cursor and the audit chain's anchor
        for sql in ("SELECT * FROM incident_feed", "SELECT * FROM audit_anchor"):
            assert [tuple(r) for r in lite.execute(sql)] == [tuple(r) for r in pg.execute(sql)]
    finally:
        lite.close()
        pg.close()


def test_migrating_again_changes_nothing_and_a_newer_store_is_refused(store_target: Path | Postgres) -> None:
    conn = open_db(store_target)
    try:
        assert migrate(conn) == SCHEMA_VERSION
        if isinstance(store_target, Postgres):
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
        else:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        with pytest.raises(StoreError, match="newer than this portal"):
            migrate(conn)
    finally:
        conn.close()


def test_instances_starting_together_migrate_a_new_database_once(pg_target: Postgres) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            open_db(pg_target).close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    conn = connect(pg_target)
    try:
        assert schema_version(conn) == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM incident_feed").fetchone()[0] == 1
    finally:
        conn.close()


# ---------------------------------------------------------------- the PostgreSQL database itself


def test_a_database_that_does_not_sort_by_code_point_is_refused(postgres: PostgresServer) -> None:
    name = "icu_sorted"
    postgres.admin(
        f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'"
    )
    target = postgres.target(name)
    try:
        with pytest.raises(StoreError, match="LC_COLLATE 'C'"):
            open_db(target)
    finally:
        postgres.drop_database(target)


def test_the_config_refuses_a_password_in_the_dsn_and_a_dsn_without_postgresql(tmp_path: Path) -> None:
    from common.configfile import ConfigError

    cases = {
        "store: {backend: postgresql, dsn: 'host=db dbname=gh user=gh password=hunter2'}\n": "holds a password",
        "store: {backend: postgresql}\n": "is needed with backend: postgresql",
        "store: {backend: postgresql, dsn: 'host=db user=gh'}\n": "names no database",
        "store: {dsn: 'host=db dbname=gh'}\n": "are for backend: postgresql",
    }
    for extra, why in cases.items():
        path = write_config(tmp_path / str(abs(hash(extra))), None, extra=extra)
        with pytest.raises(ConfigError) as e:
            load(path)
        assert why in str(e.value)
        assert "hunter2" not in str(e.value)
    good = write_config(
        tmp_path / "good",
        None,
        extra="store: {backend: postgresql, dsn: 'host=db dbname=gh user=gh', passfile: pgpass}\n",
    )
    target = load(good).store_target
    assert isinstance(target, Postgres) and target.passfile == (tmp_path / "good" / "pgpass").resolve()


def test_a_passfile_others_can_read_is_refused(pg_target: Postgres, tmp_path: Path) -> None:
    assert pg_target.passfile is not None
    loose = tmp_path / "pgpass"
    loose.write_text(pg_target.passfile.read_text())
    loose.chmod(0o644)
    with pytest.raises(StoreError, match="readable by others"):
        connect(Postgres(pg_target.dsn, loose))
    wrong = tmp_path / "wrong"
    wrong.write_text(pg_target.passfile.read_text().rsplit(":", 1)[0] + ":not-the-password\n")
    wrong.chmod(0o600)
    with pytest.raises(StoreError, match="cannot reach") as e:
        connect(Postgres(pg_target.dsn, wrong))
    assert "not-the-password" not in str(e.value)


# ---------------------------------------------------------------- the same behaviour


def door_events() -> list[wire.Event]:
    """Door states (one late, older re-send), tamper and reader flags, access decisions and a command's answer."""

    def ev(seq: int, etype: str, secs: int, place: dict[str, str], data: dict[str, Any]) -> wire.Event:
        ts = T0 + timedelta(seconds=secs)
        return wire.Event(
            id=str(ULID.from_datetime(ts)),
            seq=seq,
            ts=ts,
            type=etype,
            device="door-ctl",
            place=wire.Place(site=SITE, **place),
            point="in1",
            priority=wire.Priority.ROUTINE,
            data=data,
        )

    d1 = {"building": "3", "unit": "2", "door": "d1"}
    return [
        ev(1, "door.state", 10, d1, {"state": "open"}),
        ev(2, "door.state", 5, d1, {"state": "closed"}),  # older: does not roll the door back
        ev(3, "door.tamper", 20, d1, {}),
        ev(4, "reader.offline", 21, d1, {}),
        ev(
            5,
            "access.granted",
            30,
            d1,
            {"subject": "r:abc", "house": "3-2-301", "kind": "resident", "pass_id": "ff00", "reason": "ok"},
        ),
        ev(
            6,
            "access.denied",
            31,
            {"building": "3", "unit": "2"},
            {"door": "d2", "reason": "expired", "detail": "pass ended", "reader": "qr-2"},
        ),
        ev(7, "command.result", 40, {}, {"command_id": "c1", "ok": True, "detail": "relay read back"}),
        ev(8, "door.state", 50, d1, {"state": "sideways"}),  # not a state: nothing
        # A pass granted on paper whose door did not open, and a guard's remote unlock the same: in the access log.
        ev(
            9,
            "door.unlock_failed",
            60,
            d1,
            {
                "door": "d1",
                "reader": "qr-1",
                "reason": "relay_not_moved",
                "detail": "read-back: lock_relay reads off",
                "token": "grant:d1:1",
                "pass_id": "ee00",
                "kind": "resident",
                "subject": "r:abc",
                "house": "3-2-301",
            },
        ),
        ev(
            10,
            "door.unlock_failed",
            61,
            d1,
            {
                "door": "d1",
                "reader": None,
                "reason": "bus_down",
                "detail": "link down",
                "kind": "remote",
                "subject": "guard:bob",
                "pass_id": None,
                "house": None,
            },
        ),
    ]


async def test_events_keep_door_states_and_the_access_log_the_same_on_both(tmp_path: Path, pg_target: Postgres) -> None:
    seen = []
    events = door_events()
    for target in (tmp_path / "portal.db", pg_target):
        store = Store(target, key=store_key(target))
        await store.start()
        try:
            await store.run_write(
                lambda c: c.execute(
                    "INSERT INTO door_commands (id, site, gateway, door, reason, by_user, sent_at, status)"
                    " VALUES ('c1', ?, ?, 'd1', 'delivery', 'guard:bob', 't', 'pending')",
                    (SITE, GATEWAY),
                )
            )
            res = await store.write(StoreBatch(wire.batch_events(SITE, GATEWAY, events)))
            again = await store.write(StoreBatch(wire.batch_events(SITE, GATEWAY, events[:3])))
            assert len(res.new_events) == 10 and again.duplicates == 3 and not again.new_events

            def read(c: Any) -> list[Any]:
                return [
                    [tuple(r) for r in c.execute(sql)]
                    for sql in (
                        "SELECT * FROM door_states ORDER BY site, door",
                        "SELECT event_id, ts, site, gateway, door, building, unit, house, subject, kind, result,"
                        " reason,"
                        " reader, pass_id, by_user, note FROM access_log ORDER BY event_id",
                        "SELECT id, status, detail, answered_at FROM door_commands",
                    )
                ]

            seen.append(await store.read(read))
        finally:
            await store.close()
    assert seen[0] == seen[1]
    states, log, commands = seen[0]
    assert [s[:6] for s in states] == [(SITE, "d1", GATEWAY, "3", "2", "open")]
    assert states[0][8] == 1 and states[0][10] == 1  # tamper, reader offline
    assert [(r[4], r[10], r[11]) for r in log] == [
        ("d1", "granted", ""),
        ("d2", "denied", "expired"),
        ("d1", "failed", "relay_not_moved"),
        ("d1", "failed", "bus_down"),
    ]
    failed, remote = log[2], log[3]
    assert (failed[8], failed[9], failed[12], failed[13]) == ("r:abc", "resident", "qr-1", "ee00")
    assert failed[15] == "read-back: lock_relay reads off"
    assert (remote[9], remote[14], remote[15]) == ("remote", "guard:bob", "link down")
    assert commands[0][1:3] == ("opened", "relay read back")


# ---------------------------------------------------------------- two writers on one PostgreSQL

WRITER = r"""
import asyncio, json, sys
from gateway import wire
from portal.alarms import incidents as alarms
from portal.store import Postgres, Store, StoreBatch
from pathlib import Path

target = Postgres(sys.argv[1], Path(sys.argv[2]))
plan = json.loads(Path(sys.argv[3]).read_text())

async def main():
    store = Store(target, batch_max=int(sys.argv[4]))
    await store.start()
    try:
        futs = []
        for site, gw, payload in plan:
            batch = wire.decode_batch(payload.encode(), site=site, gateway=gw)
            futs.append(await store.enqueue(StoreBatch(batch)))
            if len(futs) % 7 == 0:
                futs.append(await store.enqueue(alarms.FeedIncidents()))
        for f in futs:
            await f
        while (await store.write(alarms.FeedIncidents())).more:
            pass
    finally:
        await store.close()
    print("done", flush=True)

asyncio.run(main())
"""


def _alarm(seq: int, gw: str) -> wire.Event:
    """An alarm of a zone of its own (so each opens an incident), with a fresh ULID."""
    ts = T0 + timedelta(milliseconds=seq)
    return wire.Event(
        id=str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type="zone.alarm",
        device="panel-1",
        place=wire.Place(site=SITE, zone=f"z{gw}{seq}"),
        point=f"in{seq}",
        priority=wire.Priority.INTRUSION,
        data={"n": seq},
    )


def test_two_writer_processes_store_every_event_once_and_count_every_seq(pg_target: Postgres, tmp_path: Path) -> None:
    n, gateways = 240, ("gw1", "gw2")
    events = {gw: [_alarm(s, gw) for s in range(1, n + 1)] for gw in gateways}
    plans = []
    for w in range(2):
        plan = []
        for gw in gateways:
            size = 5 if w == 0 else 3
            chunks = [events[gw][i : i + size] for i in range(0, n, size)]
            for chunk in chunks if w == 0 else reversed(chunks):  # one from the start, one from the end
                plan.append((SITE, gw, wire.encode(wire.batch_events(SITE, gw, chunk)).decode()))
        path = tmp_path / f"plan{w}.json"
        path.write_text(json.dumps(plan))
        plans.append(path)
    open_db(pg_target).close()  # migrated once, so both writers start at the same moment on a ready store
    assert pg_target.passfile is not None
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, pg_target.dsn, str(pg_target.passfile), str(p), str(batch)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p, batch in zip(plans, (16, 64), strict=True)
    ]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        assert out.strip() == "done"
    conn = connect(pg_target)
    try:
        for gw in gateways:
            stored = [r[0] for r in conn.execute("SELECT seq FROM events WHERE gateway = ? ORDER BY seq", (gw,))]
            assert stored == list(range(1, n + 1))
            g = conn.execute("SELECT * FROM gateways WHERE site = ? AND gateway = ?", (SITE, gw)).fetchone()
            assert (g["contiguous_seq"], g["max_seq"], g["events_stored"]) == (n, n, n)
            assert json.loads(g["islands"]) == [] and json.loads(g["open_gaps"]) == []
            assert g["gaps_noticed"] == g["gaps_closed"]
        # every alarm became one incident, each event logged once, and the feed's cursor is past them all
        assert conn.execute("SELECT count(*) FROM incidents").fetchone()[0] == 2 * n
        assert conn.execute("SELECT count(*), count(DISTINCT event_id) FROM incident_log").fetchone()[:] == (
            2 * n,
            2 * n,
        )
        assert (
            conn.execute("SELECT last_pk FROM incident_feed").fetchone()[0]
            == conn.execute("SELECT max(pk) FROM events").fetchone()[0]
        )
    finally:
        conn.close()


# ---------------------------------------------------------------- a server that goes away


async def test_the_store_connects_again_after_the_server_dropped_it(
    pg_target: Postgres, postgres: PostgresServer
) -> None:
    store = Store(pg_target, key=store_key(pg_target))
    await store.start()
    try:
        await store.write(StoreBatch(wire.batch_events(SITE, GATEWAY, [_alarm(1, GATEWAY)])))
        name = dict(p.split("=", 1) for p in pg_target.dsn.split())["dbname"]
        postgres.admin(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            " AND pid != pg_backend_pid()"
        )
        with pytest.raises(StoreError):  # the transaction under way when the server went: failed, not lost silently
            await store.write(StoreBatch(wire.batch_events(SITE, GATEWAY, [_alarm(2, GATEWAY)])))
        assert not store.ok
        res = await store.write(StoreBatch(wire.batch_events(SITE, GATEWAY, [_alarm(2, GATEWAY)])))
        assert res.ack_seqs == [2] and store.ok
        assert [e["seq"] for e in await store.events(EventQuery(limit=10))] == [2, 1]
    finally:
        await store.close()


async def test_incident_actions_are_one_winner_across_instances(pg_target: Postgres) -> None:
    a, b = Store(pg_target, key=store_key(pg_target)), Store(pg_target, key=store_key(pg_target))
    await a.start()
    await b.start()
    try:
        await a.write(StoreBatch(wire.batch_events(SITE, GATEWAY, [_alarm(1, GATEWAY)])))
        [iid] = (await a.write(alarms.FeedIncidents())).new_ids
        results = await asyncio.gather(
            a.write(alarms.IncidentAction(iid, "ack", "guard:amy")),
            b.write(alarms.IncidentAction(iid, "ack", "guard:bob")),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, dict)]
        lost = [r for r in results if isinstance(r, alarms.IncidentConflict)]
        assert len(won) == 1 and len(lost) == 1
        assert lost[0].incident["owner"] == won[0]["owner"]  # the loser is told who won, and what they did
        assert lost[0].incident["version"] == won[0]["version"]
        assert lost[0].winner is not None and (lost[0].winner["actor"], lost[0].winner["action"]) == (
            won[0]["owner"],
            "ack",
        )
    finally:
        await a.close()
        await b.close()


async def test_the_events_a_commit_reports_are_the_events_stored(store_target: Path | Postgres) -> None:
    """What a commit hands on (to the consoles, the doors, the other instances) is made from the batch as decoded;
    what a page reads later comes back from the rows. The two must be the same event, whatever its data holds:
    text that JSON escapes, integers past 64 bits, floats at their limits, nesting, empties, a place's optional
    fields left out."""
    raw = (
        (
            '{"v":VERSION,"site":"s1","gateway":"gw1","events":['
            '{"id":"01JEKQ0000000000000000000A","seq":1,"ts":"2026-03-01T08:00:00.123456Z","type":"zone.alarm",'
            '"device":"pp1","place":{"site":"s1","building":"3","unit":"1","house":"101"},"point":"zone1","priority":2,'
            '"data":{"text":"门已开 \\u2028 \\"q\\" \\\\ 🚪","big":123456789012345678901234,"u64":18446744073709551615,'
            '"f":0.1,"huge":1e300,"tiny":5e-324,"neg0":-0.0,"list":[1,"a",null,true,{"k":[]}],"empty":{},"b":false}},'
            '{"id":"01JEKQ0000000000000000000B","seq":2,"ts":"2026-03-01T08:00:01Z","type":"test.synthetic",'
            '"device":"gateway","place":{"site":"s1"}}]}'
        )
        .replace("VERSION", str(wire.SCHEMA_VERSION))
        .encode()
    )
    batch = wire.decode_batch(raw, site=SITE, gateway=GATEWAY)
    store = Store(store_target, key=store_key(store_target))
    await store.start()
    try:
        told = (await store.write(StoreBatch(batch))).new_events
        stored = await store.events(EventQuery(site=SITE, gateway=GATEWAY, after_seq=0))
    finally:
        await store.close()
    assert [e["id"] for e in told] == [e["id"] for e in stored] == [ev.id for ev in batch.events]
    for live, read in zip(told, stored, strict=True):
        assert json.dumps(live, sort_keys=True) == json.dumps(read, sort_keys=True)
        assert list(live) == list(read)  # the same keys in the same order
    assert told[0]["data"]["big"] == 123456789012345678901234 and told[1]["data"] == {}
