"""The platform's status callbacks as an outsider sees them: unsigned, forged, stale, replayed, redirected from the
other direction, malformed, out of order, for an unknown event. Only a fresh, correctly signed callback of a known
event changes anything, and only once. Signatures here are computed with hmac directly (docs/grid.md), not with
the portal's own code. The grid config is checked strictly at start-up and by ``python -m portal check``."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gateway.tooling.broker import free_port
from portal.alarms import incidents as alarms
from portal.alarms.board import BOARD
from tests.grid_support import KEY, grid_yaml, key_file
from tests.portal_support import ROOT, Portal, running_portal, write_config
from tests.registry_support import admin_session, estate_csv, form, import_csv, plate_code

PATH = "/api/grid/callback"


def _sign(key: str, ts: str, method: str, path: str, body: bytes) -> str:
    mac = hmac.new(key.encode(), f"{ts}\n{method}\n{path}\n".encode() + body, hashlib.sha256)
    return "hmac-sha256=" + mac.hexdigest()


def _status(number: str, status: str, cid: str, at: str = "2026-03-01T08:00:00Z", **kw: Any) -> bytes:
    body = {
        "schema": "gatehouse.grid.status",
        "v": 1,
        "callback_id": cid,
        "number": number,
        "case_id": "WG1",
        "status": status,
        "at": at,
        "by": "网格员 李四",
        "note": "",
        **kw,
    }
    return json.dumps(body, ensure_ascii=False).encode()


async def _call(
    p: Portal,
    body: bytes,
    *,
    key: str = KEY,
    key_id: str = "gatehouse",
    ts: int | None = None,
    path: str = PATH,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    t = str(int(time.time()) if ts is None else ts)
    h = (
        headers
        if headers is not None
        else {
            "X-Grid-Key-Id": key_id,
            "X-Grid-Timestamp": t,
            "X-Grid-Signature": _sign(key, t, "POST", path, body),
            "Content-Type": "application/json",
        }
    )
    r = await p.client.post(PATH, data=body, headers=h)  # no cookie, no Origin, no CSRF token: a machine's call
    return r.status, await r.json()


async def _sos_case(p: Portal) -> tuple[str, int]:
    csrf = await admin_session(p)
    assert (await import_csv(p, csrf, estate_csv()))[0] == 200
    code = await plate_code(p, "3", "2", "301")
    page = await (await p.client.get(f"/p/{code}")).text()
    r = await form(p, f"/p/{code}/sos", {}, page.split('name="csrf" value="')[1].split('"')[0])
    assert r.status == 303
    await p.client.app[BOARD].feed_now()
    row = await p.services.store.read(lambda c: c.execute("SELECT number, incident_id FROM grid_cases").fetchone())
    await p.client.post("/logout", data={"csrf": csrf}, headers={"Origin": p.origin})
    p.client.session.cookie_jar.clear()
    return row[0], row[1]


async def _changes(p: Portal) -> tuple[int, int, int]:
    return await p.services.store.read(
        lambda c: (
            c.execute("SELECT count(*) FROM grid_status_log").fetchone()[0],
            c.execute("SELECT count(*) FROM incident_log WHERE action = 'grid'").fetchone()[0],
            c.execute("SELECT count(*) FROM audit WHERE action = 'grid.status'").fetchone()[0],
        )
    )


async def test_only_a_fresh_signed_callback_of_a_known_event_changes_anything_and_only_once(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api/v1"  # the platform's delivery side is not what is tested here
    async with running_portal(write_config(tmp_path, None, extra=grid_yaml(tmp_path, dead))) as p:
        number, iid = await _sos_case(p)
        before = await _changes(p)
        good = _status(number, "accepted", "cb-1")
        # Unsigned, the wrong key id, another key, a stale or future timestamp, the other direction's path.
        assert (await _call(p, good, headers={"Content-Type": "application/json"}))[0] == 401
        assert (await _call(p, good, key_id="someone-else"))[0] == 401
        assert (await _call(p, good, key="not-the-shared-key-0000000000000"))[1]["error"] == "bad-signature"
        assert (await _call(p, good, ts=int(time.time()) - 301))[1]["error"] == "stale"
        assert (await _call(p, good, ts=int(time.time()) + 301))[1]["error"] == "stale"
        assert (await _call(p, good, path="/api/v1/events"))[0] == 401  # a record going up, played back
        t = str(int(time.time()))
        sig = _sign(KEY, t, "POST", PATH, good)
        tampered = good.replace(b'"accepted"', b'"closed"')  # a body changed after it was signed
        assert (
            await _call(
                p, tampered, headers={"X-Grid-Key-Id": "gatehouse", "X-Grid-Timestamp": t, "X-Grid-Signature": sig}
            )
        )[0] == 401
        assert (
            await _call(
                p, good, headers={"X-Grid-Key-Id": "gatehouse", "X-Grid-Timestamp": "1e9", "X-Grid-Signature": sig}
            )
        )[0] == 401
        assert await _changes(p) == before
        # Signed but not the contract: malformed, an unknown field, a status it does not know. Clear errors.
        for bad in (
            b"{not json",
            _status(number, "accepted", "cb-x", extra="x"),
            _status(number, "finished", "cb-y"),
            _status(number, "accepted", "bad id with spaces"),
        ):
            status, body = await _call(p, bad)
            assert status == 400 and body["error"] == "invalid" and body["detail"], body
        status, body = await _call(p, _status("GH-s1-NOSUCHEVENT", "accepted", "cb-2"))
        assert status == 404 and body["error"] == "unknown-event"
        assert await _changes(p) == before
        # The real one, then the same again (a platform that calls back twice, or a replay): applied once.
        status, body = await _call(p, good)
        assert status == 200 and body == {"number": number, "callback_id": "cb-1", "duplicate": False, "current": True}
        status, body = await _call(p, good)
        assert status == 200 and body["duplicate"] is True
        assert await _changes(p) == (before[0] + 1, before[1] + 1, before[2] + 1)
        # A later status, then an earlier one arriving late: logged, but the newest is what shows.
        assert (await _call(p, _status(number, "closed", "cb-3", at="2026-03-01T09:00:00Z")))[1]["current"]
        late = await _call(p, _status(number, "dispatched", "cb-4", at="2026-03-01T08:30:00Z"))
        assert late[0] == 200 and late[1]["current"] is False
        inc = await p.services.store.read(lambda c: alarms.get_incident(c, iid))
        assert inc is not None and inc["grid"]["status"] == "closed"
        case = await p.services.store.read(lambda c: dict(c.execute("SELECT * FROM grid_cases").fetchone()))
        assert case["accepted_at"] == "2026-03-01T08:00:00.000000Z"
        assert case["closed_at"] == "2026-03-01T09:00:00.000000Z"
        # Over the body cap: refused before anything is read into the store.
        big = _status(number, "handling", "cb-5", note="x" * 70_000)
        assert (await _call(p, big))[0] == 413


async def test_two_statuses_of_the_same_second_out_of_order_never_move_a_case_back(tmp_path: Path) -> None:
    """The platform stamps whole seconds (as the contract's examples do): 处置中 and 已办结 in the same second, the
    callbacks crossing on the way. The case and its incident show 已办结 whichever comes first; the late 处置中 is
    logged, not shown."""
    dead = f"http://127.0.0.1:{free_port()}/api/v1"
    async with running_portal(write_config(tmp_path, None, extra=grid_yaml(tmp_path, dead))) as p:
        number, iid = await _sos_case(p)
        same = "2026-03-01T08:05:00Z"
        assert (await _call(p, _status(number, "accepted", "cb-1", at=same)))[1]["current"] is True
        assert (await _call(p, _status(number, "closed", "cb-3", at=same)))[1]["current"] is True
        status, late = await _call(p, _status(number, "handling", "cb-2", at=same))  # sent before, arrives after
        assert status == 200 and late["duplicate"] is False and late["current"] is False
        case = await p.services.store.read(lambda c: dict(c.execute("SELECT * FROM grid_cases").fetchone()))
        assert (case["status"], case["closed_at"]) == ("closed", "2026-03-01T08:05:00.000000Z")
        inc = await p.services.store.read(lambda c: alarms.get_incident(c, iid))
        assert inc is not None and inc["grid"]["status"] == "closed"
        logged = await p.services.store.read(
            lambda c: [r[0] for r in c.execute("SELECT status FROM grid_status_log ORDER BY id")]
        )
        assert logged == ["accepted", "closed", "handling"]


async def test_without_a_grid_link_the_callback_is_not_there(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        status, body = await _call(p, _status("GH-s1-01ABCDEF", "accepted", "cb-1"))
        assert status == 404 and body["error"] == "not-found"
        r = await p.client.get("/grid/reports", allow_redirects=False)
        assert r.status == 303  # a page for signed-in staff: off to sign in


def _check(cfg: Path) -> tuple[int, str]:
    r = subprocess.run(
        [sys.executable, "-m", "portal", "check", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = "".join(ln for ln in r.stderr.splitlines(keepends=True) if not ln.startswith("warning: "))
    return r.returncode, problems  # (a valid config may still be warned about: public_url, an office phone)


def test_the_grid_config_is_checked_strictly(tmp_path: Path) -> None:
    ok = write_config(tmp_path / "ok", None, extra=grid_yaml(tmp_path / "ok", "https://grid.example.gov.cn/api/v1"))
    assert _check(ok) == (0, "")
    loose = tmp_path / "ok" / "grid.key"
    loose.chmod(0o644)
    code, err = _check(ok)
    assert code == 2 and "grid.key" in err and "chmod 600" in err
    key_file(tmp_path / "ok", "short")
    code, err = _check(ok)
    assert code == 2 and "at least 16 characters" in err
    cases = {
        "url: http://grid.example.gov.cn/api": "plain http only on loopback",
        "url: ftp://x": "is not a URL",
        "rules: [{on: lasting, kinds: [fault]}]": "a lasting rule needs after_s",
        "rules: [{on: open, kinds: [tea]}]": "kind 'tea' has no grid category",
        "rules: [{on: open, causes: [real]}]": "causes and flags are for close rules only",
        "rules: [{on: close, flags: [fire]}]": "Invalid enum value 'fire'",
        "sites: []": "list the sites that report up",
        "client_cert_file: a.pem": "mutual TLS needs both",
        "colour: blue": "unknown field",
    }
    for line, expect in cases.items():
        folder = tmp_path / f"c{abs(hash(line))}"
        base = grid_yaml(folder, "https://grid.example.gov.cn/api/v1")
        key = line.split(":", 1)[0]
        text = "\n".join(ln for ln in base.splitlines() if not ln.strip().startswith(f"{key}:")) + f"\n  {line}\n"
        code, err = _check(write_config(folder, None, extra=text))
        assert code == 2, (line, err)
        assert expect in err, (line, err)
    # A category of its own makes a new kind acceptable (care alerts, or anything to come).
    folder = tmp_path / "care"
    text = grid_yaml(
        folder,
        "https://grid.example.gov.cn/api/v1",
        more="""
  rules: [{on: open, kinds: [tea]}]
  categories: {tea: {category: "06", category_name: 扩展事件, subcategory: "0688", subcategory_name: 茶水事故}}
""",
    )
    assert _check(write_config(folder, None, extra=text)) == (0, "")
