"""A portal process on PostgreSQL through its main flows, as its users and tools meet them: the office imports the
estate and adds a guard (command line), the portal starts on a database it creates the schema in, a gateway's
events are ingested and acknowledged, a guard signs in and acknowledges the alarm, the office hands a resident a
one-time code and the resident signs in with it and sets a password, then the retention purge and the audit
chain's check run from the command line beside the running portal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from portal.store import Postgres, connect
from tests.portal_support import (
    ROOT,
    batch_payload,
    devices,
    event,
    mqtt,
    next_ack,
    portal_process,
    wait_for,
    write_config,
)
from tests.registry_support import ADMIN, ADMIN_PW, GUARD, GUARD_PW, RESIDENT_ROW, estate_csv
from tests.test_resident_accounts import OTC_RE, ZHANG

ZHANG_PW = "zhangwei-own-pass-1"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portal", *args, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def rows(target: Postgres, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = connect(target, readonly=True)
    try:
        return [tuple(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


async def test_a_portal_process_on_postgresql_through_its_main_flows(
    tmp_path: Path, broker: MosquittoProcess, pg_target: Postgres
) -> None:
    config = write_config(
        tmp_path,
        broker,
        client_id="portal-pg",
        extra=(f"store: {{backend: postgresql, dsn: '{pg_target.dsn}', passfile: {pg_target.passfile}}}\n"),
    )
    for user, role, pw in ((ADMIN, "admin", ADMIN_PW), (GUARD, "guard", GUARD_PW)):
        (tmp_path / f"{user}.pw").write_text(pw)
        r = cli(config, "adduser", "--user", user, "--role", role, "--password-file", str(tmp_path / f"{user}.pw"))
        assert r.returncode == 0, r.stderr
    (tmp_path / "estate.csv").write_text(estate_csv(), encoding="utf-8")
    r = cli(config, "import-estate", str(tmp_path / "estate.csv"))
    assert r.returncode == 0 and "postgresql store" in r.stdout, r.stderr
    assert not list((tmp_path / "data").glob("*.db"))  # nothing went to a SQLite file

    async with mqtt(broker) as gw:
        await gw.subscribe(wire.topic("s1", "gw1", "ack"), qos=1)
        with portal_process(config) as pp:
            assert pp.first_admin is None  # the command line made the office's account in the same database
            url = pp.url.rstrip("/")
            async with devices(url) as new:
                guard = new("127.0.7.1")
                assert (await guard.sign_in(GUARD, GUARD_PW)).status == 303

                async def connected() -> bool:
                    r = await guard.get("/api/health")
                    return bool((await r.json()).get("broker", {}).get("connected"))

                await wait_for(connected, what="the portal's MQTT connection")
                # a gateway's alarm: stored once, acknowledged to the gateway; a re-send is acknowledged, not stored
                batch = [event(1, type="zone.alarm"), event(2, type="zone.alarm", zone="z9")]
                await gw.publish(wire.topic("s1", "gw1", "events"), batch_payload(batch), qos=1)
                assert (await next_ack(gw)).seqs == [1, 2]
                await gw.publish(wire.topic("s1", "gw1", "events"), batch_payload(batch[:1]), qos=1)
                assert (await next_ack(gw)).seqs == [1]
                assert rows(pg_target, "SELECT count(*), max(seq) FROM events WHERE gateway = 'gw1'") == [(2, 2)]

                async def incident() -> dict[str, Any] | None:
                    r = await guard.get("/api/board")
                    body = await r.json()
                    return next((i for i in body["incidents"] if i["first_event"] == batch[0].id), None)

                inc = await wait_for(incident, what="the alarm on the board")
                csrf = await guard.csrf("/board")
                r = await guard.http.post(
                    f"/api/incidents/{inc['id']}/ack", json={}, headers={**guard.headers(), "X-CSRF-Token": csrf}
                )
                assert r.status == 200, await r.text()
                assert (await r.json())["incident"]["state"] == "acknowledged"
                r = await guard.http.post(
                    f"/api/incidents/{inc['id']}/ack", json={}, headers={**guard.headers(), "X-CSRF-Token": csrf}
                )
                assert r.status == 409 and (await r.json())["winner"]["actor"] == GUARD

                # the office hands a resident a one-time code; the resident signs in and sets a password
                office = new("127.0.9.9")
                assert (await office.sign_in(ADMIN, ADMIN_PW)).status == 303
                office_csrf = await office.csrf("/admin/registry")
                [(rid,)] = rows(pg_target, RESIDENT_ROW.replace("r.*", "r.id") + " LIMIT 1", ZHANG, "301")
                r = await office.post(f"/admin/registry/residents/{rid}/code", {}, csrf=office_csrf)
                m = OTC_RE.search(await r.text())
                assert r.status == 200 and m
                phone = new("127.0.21.5")
                r = await phone.resident_sign_in(ZHANG, m.group(1))
                assert r.status == 303 and r.headers["Location"].startswith("/m/password")
                r = await phone.post("/m/password", {"new": ZHANG_PW, "confirm": ZHANG_PW, "next": "/m"})
                assert r.status == 303, await r.text()
                again = new("127.0.21.6")
                assert (await again.resident_sign_in(ZHANG, ZHANG_PW)).status == 303
                assert again.cookie("gh_resident")

            # the tools beside the running portal
            r = cli(config, "purge")
            assert r.returncode == 0, r.stderr
            report = json.loads(r.stdout)
            assert report["dry_run"] is False and report["transactions"] >= 1
            r = cli(config, "audit-verify")
            assert r.returncode == 0, r.stdout + r.stderr
            verdict = json.loads(r.stdout)
            assert verdict["ok"] is True and verdict["rows"] >= 6
            actions = {a for (a,) in rows(pg_target, "SELECT action FROM audit")}
            assert {"signin", "alarm.ack", "retention.purge"} <= actions, actions
            # someone with the database edits a row: the check finds it at that row
            conn = connect(pg_target)
            try:
                edited = conn.execute(
                    "UPDATE audit SET detail = 'nothing happened' WHERE action = 'alarm.ack' RETURNING id"
                ).fetchone()[0]
            finally:
                conn.close()
            r = cli(config, "audit-verify")
            assert r.returncode == 1 and json.loads(r.stdout)["bad_id"] == edited
            assert pp.stop() == 0
