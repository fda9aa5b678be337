"""The store key, played as someone with a copy of ``portal.db`` (a backup, a support bundle, a disk image) and as
someone who can write to it: plate codes are not in the file, the audit chain cannot be re-hashed without the key,
a store from before the key is sealed and keyed by the upgrade (its printed plates keep working), and a missing,
foreign or readable key file stops the portal with an error that says what to do."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import zxingcpp
from PIL import Image
from playwright.async_api import async_playwright

from gateway.wire.passes import keyring, parse_pass
from portal.config import load
from portal.estate import registry as reg
from portal.store import Postgres, StoreError, audit_hash, connect, migrate, storekey
from portal.store.schema import steps
from tests.doors_support import estate_with_doors, guard_session
from tests.portal_support import ROOT, Portal, portal_process, running_portal, store_key, write_config
from tests.registry_support import (
    admin_session,
    estate_csv,
    form,
    import_csv,
    plate_code,
    plate_codes,
    resident_row,
)
from tests.test_revocations import OWNER_PHONE, guard_visitor, issue_visitor_pass, resident_browser
from tests.test_visitors import CHROMIUM, FLAGS


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portal", *map(str, args)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )


def _files(db: Path) -> bytes:
    """Every byte of the store as a copy of its folder would hold it (database, WAL, shared memory)."""
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists())


async def test_a_copy_of_the_database_holds_no_plate_code(tmp_path: Path) -> None:
    """An estate imported and one plate re-issued through the portal: the portal still prints every plate in use,
    and the database file alone holds none of those codes, nor the withdrawn one."""
    cfg = write_config(tmp_path, None, extra="public_url: https://wy.example.cn\n")  # plates print to it
    async with running_portal(cfg) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        before = plate_codes(cfg)
        hid = await p.services.store.read(
            lambda c: c.execute(
                "SELECT h.id FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id WHERE h.code = '301' AND u.code ="
                " '2'"
            ).fetchone()[0]
        )
        r = await form(p, "/admin/registry/plates/reissue", {"kind": "house", "id": str(hid), "confirmed": "yes"}, csrf)
        assert r.status == 303
        after = plate_codes(cfg)
        withdrawn = before[("3", "2", "301")]
        assert after[("3", "2", "301")] != withdrawn and len(after) == len(before) == 8
        r = await p.client.get(f"/admin/registry/plates/house/{hid}.svg")
        assert r.status == 200  # printing opens the sealed code
    db = load(cfg).db_path
    data = _files(db)
    for code in [*after.values(), withdrawn]:
        assert code.encode() not in data, code
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT * FROM plates").fetchall()
        digest = hashlib.sha256(withdrawn.encode()).hexdigest()
        gone = conn.execute("SELECT sealed FROM plates WHERE code_hash = ?", (digest,)).fetchone()
    finally:
        conn.close()
    assert all(not any(isinstance(v, str) and v in (*after.values(), withdrawn) for v in row) for row in rows)
    assert gone == (None,)  # a withdrawn plate's code is not kept even sealed


# ---------------------------------------------------------------- a store from before the key


OLD_HOUSE = "Hq7-pLateCodeOfSchema8x"
OLD_ENTRANCE = "En7-pLateCodeOfSchema8y"
OLD_WITHDRAWN = "Wd7-pLateWithdrawnEarlier"


SEALED = next(s.version for s in steps("sqlite") if s.name == "sealed_passes")  # visitor passes sealed
KEYED = next(s.version for s in steps("sqlite") if s.name == "store_key") - 1  # the step before the store key's


def _plain_audit(conn: sqlite3.Connection, rid: int, prev: str, action: str) -> str:
    """An audit row as the portal wrote it before the store key: chained with plain SHA-256."""
    at = f"2026-02-0{rid}T08:00:00.000000Z"
    h = audit_hash(prev, rid, at, "admin:alice", action, f"house:{rid}", "", "10.0.0.9")
    conn.execute(
        "INSERT INTO audit (id, at, actor, action, target, detail, remote, prev_hash, hash)"
        " VALUES (?, ?, 'admin:alice', ?, ?, '', '10.0.0.9', ?, ?)",
        (rid, at, action, f"house:{rid}", prev, h),
    )
    conn.execute(
        "INSERT INTO audit_anchor (id, last_id, hash, count) VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE"
        " SET last_id = excluded.last_id, hash = excluded.hash, count = excluded.count",
        (rid, h, rid),
    )
    return h


def unkeyed_store(db: Path, *, broken: bool = False) -> None:
    """A store as the portal left it before the store key: plate codes in clear beside their hashes, a plain audit
    chain."""
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(db)
    try:
        migrate(conn, upto=KEYED)
        conn.execute("BEGIN IMMEDIATE")
        sid = reg.ensure_site(conn, "s1", "阳光花园")
        bid = conn.execute("INSERT INTO reg_buildings (site_id, code) VALUES (?, '3')", (sid,)).lastrowid
        uid = conn.execute("INSERT INTO reg_units (building_id, code) VALUES (?, '2')", (bid,)).lastrowid
        hid = conn.execute("INSERT INTO reg_houses (unit_id, code) VALUES (?, '301')", (uid,)).lastrowid
        for code, kind, col, ref, withdrawn in (
            (OLD_HOUSE, "house", "house_id", hid, None),
            (OLD_ENTRANCE, "entrance", "unit_id", uid, None),
            (OLD_WITHDRAWN, "house", "house_id", hid, "2026-01-02T00:00:00Z"),
        ):
            conn.execute(
                f"INSERT INTO plates (code_hash, code, kind, {col}, created_at, withdrawn_at)"
                " VALUES (?, ?, ?, ?, '2026-01-01T00:00:00Z', ?)",
                (reg.code_hash(code), code, kind, ref, withdrawn),
            )
        prev = ""
        for rid in range(1, 6):
            prev = _plain_audit(conn, rid, prev, "view.house")
        if broken:  # someone edited a row before the upgrade
            conn.execute("UPDATE audit SET actor = 'admin:mallory' WHERE id = 3")
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_an_upgraded_store_keeps_its_printed_plates_and_seals_their_codes(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, None)
    db = load(cfg).db_path
    unkeyed_store(db)
    assert OLD_HOUSE.encode() in _files(db)  # the weakness being fixed
    with portal_process(cfg) as pp:  # the upgrade runs as the portal starts (and makes the store key)
        async with aiohttp.ClientSession() as http:
            async with http.get(pp.url + f"p/{OLD_HOUSE}") as r:
                assert r.status == 200 and "301" in await r.text()  # the plate on the door still works
            async with http.get(pp.url + f"p/{OLD_ENTRANCE}") as r:
                assert r.status == 200
            async with http.get(pp.url + f"p/{OLD_WITHDRAWN}") as r:
                assert r.status == 404
        assert plate_codes(cfg) == {("3", "2", "301"): OLD_HOUSE, ("3", "2", None): OLD_ENTRANCE}  # prints the same
    data = _files(db)
    for code in (OLD_HOUSE, OLD_ENTRANCE, OLD_WITHDRAWN):
        assert code.encode() not in data, code
    assert load(cfg).key_path.stat().st_mode & 0o777 == 0o600
    r = await asyncio.to_thread(_cli, "audit-verify", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] == 6  # the five rows, chained again, and the audit.keyed row
    conn = sqlite3.connect(db)
    try:
        (detail,) = conn.execute("SELECT detail FROM audit WHERE action = 'audit.keyed'").fetchone()
    finally:
        conn.close()
    assert detail.startswith("5 rows chained with HMAC-SHA-256") and "2 plate codes sealed" in detail
    assert detail.endswith("intact")


async def test_an_edit_rehashed_with_plain_sha256_no_longer_passes(tmp_path: Path) -> None:
    """What worked against the plain chain: edit a row, compute every hash after it again, fix the anchor. The
    chain is keyed now, and whoever lacks the key file cannot do it."""
    cfg = write_config(tmp_path, None)
    db = load(cfg).db_path
    unkeyed_store(db)
    with portal_process(cfg):
        pass
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("UPDATE audit SET actor = 'admin:mallory' WHERE id = 2")
            prev = ""
            for rid, at, actor, action, target, detail, remote in conn.execute(
                "SELECT id, at, actor, action, target, detail, remote FROM audit ORDER BY id"
            ).fetchall():
                h = audit_hash(prev, rid, at, actor, action, target, detail, remote)
                conn.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", (prev, h, rid))
                prev = h
            conn.execute("UPDATE audit_anchor SET hash = ?", (prev,))
    finally:
        conn.close()
    r = await asyncio.to_thread(_cli, "audit-verify", "--config", cfg)
    assert r.returncode == 1 and "broken at row 1: hash mismatch" in r.stderr, r.stderr


async def test_a_chain_broken_before_the_upgrade_stays_reported(tmp_path: Path) -> None:
    """Keying an already edited chain must not launder the edit: the upgrade says so, and so does every check."""
    cfg = write_config(tmp_path, None)
    db = load(cfg).db_path
    unkeyed_store(db, broken=True)
    with portal_process(cfg):
        pass
    r = await asyncio.to_thread(_cli, "audit-verify", "--config", cfg)
    assert r.returncode == 1 and "already broken when the store key was introduced" in r.stderr, r.stderr
    assert "row 3" in r.stderr


# ---------------------------------------------------------------- the key file


def test_a_missing_foreign_or_readable_key_stops_the_portal_and_the_tools(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "a", None, extra="public_url: https://wy.example.cn\n")
    other = write_config(tmp_path / "b", None)
    src = tmp_path / "estate.csv"
    src.write_text(estate_csv(), encoding="utf-8")
    for c in (cfg, other):
        assert _cli("import-estate", "--config", c, src).returncode == 0
    key, foreign = load(cfg).key_path, load(other).key_path
    own = key.read_bytes()

    def refused(*args: str | Path) -> str:
        r = _cli(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (args, r.returncode, r.stderr)
        assert '"ready"' not in r.stdout
        return r.stderr

    key.unlink()
    for args in (("run",), ("audit-verify",), ("plates", "-o", tmp_path / "x.pdf"), ("export-estate",)):
        err = refused(args[0], "--config", cfg, *args[1:])
        assert "is missing" in err and str(key) in err, err
    assert not key.exists()  # no new key was made over a sealed store
    key.write_bytes(foreign.read_bytes())
    key.chmod(0o600)
    err = refused("run", "--config", cfg)
    assert "is not the key of the store" in err
    key.write_bytes(own)
    key.chmod(0o644)
    err = refused("run", "--config", cfg)
    assert "chmod 600" in err
    key.chmod(0o600)
    assert _cli("audit-verify", "--config", cfg).returncode == 0


def test_tools_starting_together_on_a_new_store_share_one_key(tmp_path: Path) -> None:
    """The portal and an import started at the same moment on a new store: one key file, the same key for both
    (not one sealing with a key that another just replaced on disk)."""
    barrier = threading.Barrier(8)
    got: list[str] = []

    def start() -> None:
        barrier.wait()
        got.append(storekey.open_for(tmp_path / "store.key", tmp_path / "portal.db").fingerprint)

    threads = [threading.Thread(target=start, name=f"test.key-{i}") for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(got) == 8 and len(set(got)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.key"]
    assert storekey.load(tmp_path / "store.key").fingerprint == got[0]


# ---------------------------------------------------------------- visitor passes


def _qr(png: bytes) -> str:
    found = [x.text for x in zxingcpp.read_barcodes(Image.open(io.BytesIO(png)), formats=zxingcpp.BarcodeFormat.QRCode)]
    assert len(found) == 1, found
    return str(found[0])


async def _slip_qr(p: Portal, vid: int) -> str:
    """The guardroom slip's QR as a browser draws it (an inline SVG), read back with a standard decoder."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            ctx = await browser.new_context(viewport={"width": 900, "height": 1000})
            await ctx.add_cookies(
                [{"name": c.key, "value": c.value, "url": p.origin} for c in p.client.session.cookie_jar]
            )
            page = await ctx.new_page()
            await page.goto(f"{p.origin}/visitors/{vid}")
            return _qr(await page.locator("#pass-qr").screenshot())
        finally:
            await browser.close()


async def test_a_copy_of_the_database_holds_no_live_visitor_pass(tmp_path: Path) -> None:
    """A guardroom pass and a resident's visitor pass issued through the portal (each opens the estate gate and a
    building's entrance for days): the slip and the share link still show QRs that read back as the signed passes,
    and no byte of the database, its WAL or its shared memory holds either pass."""
    cfg = write_config(tmp_path, None)
    async with running_portal(cfg) as p:
        await estate_with_doors(p)
        await guard_session(p)
        ring = keyring([p.services.signing_key.public_key()])
        guard = await guard_visitor(p)
        assert parse_pass(guard["pass_text"], ring).pass_id.hex() == guard["pass_id"]  # the API opens it
        assert await _slip_qr(p, int(guard["id"])) == guard["pass_text"]
        phone, csrf = await resident_browser(p, OWNER_PHONE, "301")
        try:
            token = await issue_visitor_pass(p, phone, csrf, await plate_code(p, "3", "2", "301"))
            async with phone.get(f"/m/v/{token}") as r:
                assert r.status == 200 and "<svg" in await r.text()
            async with phone.get(f"/m/v/{token}/qr.png", headers={"Referer": f"{p.origin}/m/v/{token}"}) as r:
                assert r.status == 200
                resident = _qr(await r.read())
        finally:
            await phone.close()
        shared = parse_pass(resident, ring)  # the signed pass, for the gate and the entrance
        assert shared.kind == "visitor" and shared.units == ("3/2",)
        stored = await p.services.store.read(
            lambda c: [tuple(r) for r in c.execute("SELECT pass_id, subject FROM visitor_passes")]
        )
        assert stored == [(shared.pass_id.hex(), shared.subject)]
    data = _files(load(cfg).db_path)
    for text in (guard["pass_text"], resident):
        assert len(text) > 40
        assert text.encode() not in data
        assert text[len(text) // 2 : len(text) // 2 + 24].encode() not in data  # nor a piece of it


async def test_the_visitor_pass_command_prints_what_the_share_link_shows_and_audits_it(tmp_path: Path) -> None:
    """``python -m portal visitor-pass`` beside the running portal (the demo's visitor takes the pass from it): the
    resident's latest pass, unsealed with the store key, the same text as the share link's QR; an audit row says who
    read it; a resident with no pass is told so (exit 1)."""
    cfg = write_config(tmp_path, None)
    async with running_portal(cfg) as p:
        await estate_with_doors(p)
        resident_id = int((await resident_row(p, OWNER_PHONE, "301"))["id"])

        def command() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "portal", "visitor-pass", "--config", str(cfg), "--resident", str(resident_id)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
            )

        none = await asyncio.to_thread(command)
        assert none.returncode == 1 and none.stdout == "", (none.stdout, none.stderr)
        assert f"resident {resident_id} has issued no visitor pass" in none.stderr
        phone, csrf = await resident_browser(p, OWNER_PHONE, "301")
        try:
            code = await plate_code(p, "3", "2", "301")
            await issue_visitor_pass(p, phone, csrf, code)
            token = await issue_visitor_pass(p, phone, csrf, code)  # the latest of two
            async with phone.get(f"/m/v/{token}/qr.png", headers={"Referer": f"{p.origin}/m/v/{token}"}) as r:
                assert r.status == 200
                shown = _qr(await r.read())
        finally:
            await phone.close()
        got = await asyncio.to_thread(command)
        assert got.returncode == 0, got.stderr
        assert got.stdout == shown + "\n"
        signed = parse_pass(shown, keyring([p.services.signing_key.public_key()]))
        audited = await p.services.store.read(
            lambda c: [
                tuple(r)
                for r in c.execute("SELECT actor, target, detail FROM audit WHERE action = 'visitor_pass.shown'")
            ]
        )
        assert len(audited) == 1 and audited[0][0].startswith("cli:"), audited
        assert audited[0][1:] == (f"resident {resident_id}", signed.pass_id.hex())


async def test_an_upgraded_store_seals_its_visitor_passes_and_still_shows_them(tmp_path: Path) -> None:
    """A store from before the sealing, with a guardroom pass and a resident's pass in clear: the portal seals them
    as it starts, and both still show (the API, the slip, the share link's QR)."""
    cfg = write_config(tmp_path, None)
    conf = load(cfg)
    db = conf.db_path
    db.parent.mkdir(parents=True, exist_ok=True)
    guard_text, resident_text = "GH-GUARDROOM-PASS-" + "g" * 40, "GH-RESIDENT-PASS-" + "r" * 40
    token = "OldShareLinkToken0a1b2c"  # a share link sent before the upgrade
    conn = connect(db, key=conf.store_key())
    try:
        migrate(conn, upto=SEALED - 1)
        rows, errors = reg.parse_import(estate_csv().encode())
        assert not errors
        conn.execute("BEGIN IMMEDIATE")
        reg.apply_import(conn, rows, "admin:alice")
        rid = conn.execute(
            "SELECT r.id FROM reg_residents r JOIN reg_people p ON p.id = r.person_id WHERE p.phone = ?",
            (OWNER_PHONE,),
        ).fetchone()[0]
        hid = conn.execute("SELECT house_id FROM reg_residents WHERE id = ?", (rid,)).fetchone()[0]
        until = int(time.time()) + 86400
        vid = conn.execute(
            "INSERT INTO guard_visitors (subject, name, site, building, unit, house, house_id, pass_id, pass_text,"
            " not_before, not_after, uses, note, created_at, created_by) VALUES ('v:old', '刘访客', 's1', '3', '2',"
            " '301', ?, 'aa01', ?, 0, ?, 3, '', '2026-01-01T00:00:00Z', 'guard:bob')",
            (hid, guard_text, until),
        ).lastrowid
        conn.execute(
            "INSERT INTO visitor_passes (token_hash, resident_id, pass_id, subject, pass_text, not_before,"
            " not_after, uses, created_at) VALUES (?, ?, 'bb02', 'v:x', ?, 0, ?, 2, '2026-01-01T00:00:00Z')",
            (reg.code_hash(token), rid, resident_text, until),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    assert guard_text.encode() in _files(db) and resident_text.encode() in _files(db)  # the weakness being fixed
    async with running_portal(cfg) as p:  # the upgrade runs as the portal starts
        await guard_session(p)
        body = await (await p.client.get(f"/api/visitors/{vid}")).json()
        assert body["visitor"]["pass_text"] == guard_text
        assert await _slip_qr(p, vid) == guard_text
        async with p.client.get(f"/m/v/{token}/qr.png", headers={"Referer": f"{p.origin}/m/v/{token}"}) as r:
            assert r.status == 200
            assert _qr(await r.read()) == resident_text
    data = _files(db)
    for text in (guard_text, resident_text):
        assert text.encode() not in data
        assert text[-30:].encode() not in data
    conn = sqlite3.connect(db)
    try:
        for table in ("guard_visitors", "visitor_passes"):
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            assert "pass_text" not in columns and "sealed" in columns
    finally:
        conn.close()


def test_the_sealing_step_refuses_a_store_with_passes_opened_without_the_key(tmp_path: Path) -> None:
    """A tool that opens an old store without the key must not upgrade it (it could not seal the passes)."""
    db = tmp_path / "portal.db"
    conn = connect(db, key=store_key(db))
    try:
        migrate(conn, upto=SEALED - 1)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO guard_visitors (subject, name, site, building, unit, house, pass_id, pass_text, not_before,"
            " not_after, uses, created_at, created_by) VALUES ('v:a', 'x', 's1', '3', '2', '301', 'aa', 'PASS', 0,"
            " 1, 1, '2026-01-01T00:00:00Z', 'guard:bob')"
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    conn = connect(db)
    try:
        with pytest.raises(StoreError, match="seals its visitor passes"):
            migrate(conn)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SEALED - 1
    finally:
        conn.close()


def test_the_sealing_step_seals_the_stored_passes_on_both_engines(store_target: Path | Postgres) -> None:
    """Step 17 on SQLite and on PostgreSQL: the passes stored in clear come out sealed under the store key, bound to
    their pass ids (one row's sealed pass does not open as another's), and ``pass_text`` is gone."""
    key = store_key(store_target)
    conn = connect(store_target, key=key)
    try:
        migrate(conn, upto=SEALED - 1)
        rows, errors = reg.parse_import(estate_csv().encode())
        assert not errors
        conn.execute("BEGIN")
        reg.apply_import(conn, rows, "admin:alice")
        rid = conn.execute("SELECT min(id) FROM reg_residents").fetchone()[0]
        for n in range(3):
            conn.execute(
                "INSERT INTO guard_visitors (subject, name, site, building, unit, house, pass_id, pass_text,"
                " not_before, not_after, uses, created_at, created_by) VALUES (?, 'x', 's1', '3', '2', '301', ?, ?,"
                " 0, 1, 1, '2026-01-01T00:00:00Z', 'guard:bob')",
                (f"v:g{n}", f"aa{n}", f"GUARD-PASS-{n}"),
            )
            conn.execute(
                "INSERT INTO visitor_passes (token_hash, resident_id, pass_id, subject, pass_text, not_before,"
                " not_after, uses, created_at) VALUES (?, ?, ?, ?, ?, 0, 1, 1, '2026-01-01T00:00:00Z')",
                (f"t{n}", rid, f"bb{n}", f"v:r{n}", f"RESIDENT-PASS-{n}"),
            )
        conn.execute("COMMIT")
        migrate(conn)
        for table, prefix in (("guard_visitors", "GUARD"), ("visitor_passes", "RESIDENT")):
            got = conn.execute(f"SELECT * FROM {table} ORDER BY pass_id").fetchall()
            assert "pass_text" not in dict(got[0]) and "sealed" in dict(got[0])
            opened = [key.unseal(bytes(r["sealed"]), r["pass_id"]) for r in got]
            assert opened == [f"{prefix}-PASS-{n}" for n in range(3)]
            assert all(f"{prefix}-PASS".encode() not in bytes(r["sealed"]) for r in got)
            with pytest.raises(storekey.StoreKeyError):
                key.unseal(bytes(got[0]["sealed"]), got[1]["pass_id"])
    finally:
        conn.close()
