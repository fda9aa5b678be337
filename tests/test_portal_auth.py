"""Portal sign-in, sessions, roles, CSRF and Origin checks, users, config — over real HTTP on a real store."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from portal.app import Options
from portal.config import ConfigError, load
from tests.portal_support import (
    ROOT,
    add_user,
    csrf_of,
    page_csrf,
    post_form,
    running_portal,
    sign_in,
    write_config,
)

GUARD_PW = "guard-password-0001"


async def test_first_start_admin_must_change_password(tmp_path: Path) -> None:
    # No broker at all (port 1): the portal serves pages anyway.
    async with running_portal(write_config(tmp_path, None)) as p:
        otp = p.admin_password
        assert len(otp) >= 12
        r = await sign_in(p, "admin", otp)
        assert r.status == 303 and r.headers["Location"] == "/password"
        # Every other page sends the admin back to the password page; the API refuses.
        r = await p.client.get("/console", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/password"
        r = await p.client.get("/api/events")
        assert r.status == 403 and (await r.json())["error"] == "password-change-required"
        page = await p.client.get("/password")
        html = await page.text()
        assert 'id="forced"' in html
        csrf = csrf_of(html)
        new = "a-much-better-passphrase"
        for form, key in [
            ({"current": "wrong-password-123", "new": new, "confirm": new}, "当前密码不正确"),
            ({"current": otp, "new": "short", "confirm": "short"}, "至少需要 12 个字符"),
            ({"current": otp, "new": new, "confirm": new + "x"}, "不一致"),
            ({"current": otp, "new": otp, "confirm": otp}, "不能与当前密码相同"),
        ]:
            r = await post_form(p, "/password", form, csrf=csrf)
            assert r.status == 400
            assert key in await r.text()
        old_cookie = p.client.session.cookie_jar.filter_cookies(p.client.make_url("/"))["gh_session"].value
        r = await post_form(p, "/password", {"current": otp, "new": new, "confirm": new}, csrf=csrf)
        assert r.status == 303 and r.headers["Location"].startswith("/console")
        r = await p.client.get("/console")
        assert r.status == 200
        assert "值班台" in await r.text()
        # The session from before the change is gone (a new id was issued).
        r = await p.client.get("/console", allow_redirects=False, cookies={"gh_session": old_cookie})
        assert r.status == 303 and r.headers["Location"].startswith("/login")
    # The one-time password no longer works after a restart on the same store; the new one does.
    async with running_portal(write_config(tmp_path, None)) as p2:
        assert p2.services.first_admin_file is None
        r = await sign_in(p2, "admin", otp)
        assert r.status == 401
        r = await sign_in(p2, "admin", new)
        assert r.status == 303 and r.headers["Location"] == "/console"


async def test_wrong_password_and_unknown_user_are_rejected(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        await add_user(p, "guard1", "guard", GUARD_PW)
        for user, pw in [("guard1", "not-the-password"), ("nobody", GUARD_PW), ("guard1", ""), ("", "")]:
            r = await sign_in(p, user, pw)
            assert r.status == 401, (user, pw)
            assert "用户名或密码错误" in await r.text()
            assert "gh_session" not in {c.key for c in p.client.session.cookie_jar}
        r = await p.client.get("/console", allow_redirects=False)
        assert r.status == 303
        r = await sign_in(p, "GUARD1", GUARD_PW)  # user names are case-insensitive
        assert r.status == 303 and r.headers["Location"] == "/console"


async def test_sign_in_is_throttled_after_repeated_failures(tmp_path: Path) -> None:
    now = [1000.0]
    async with running_portal(write_config(tmp_path, None), Options(monotonic=lambda: now[0])) as p:
        await add_user(p, "guard1", "guard", GUARD_PW)
        for _ in range(10):
            assert (await sign_in(p, "guard1", "wrong-password-x")).status == 401
        r = await sign_in(p, "guard1", GUARD_PW)
        assert r.status == 429  # even the right password waits out the window
        now[0] += 15 * 60 + 1
        r = await sign_in(p, "guard1", GUARD_PW)
        assert r.status == 303


async def test_csrf_token_and_origin_are_required(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        await add_user(p, "boss", "admin", "admin-password-0001")
        # Sign-in itself: no token, a wrong token, a foreign origin, no origin at all.
        page = await p.client.get("/login")
        token = csrf_of(await page.text())
        creds = {"user": "boss", "password": "admin-password-0001"}
        assert (await post_form(p, "/login", creds)).status == 403
        assert (await post_form(p, "/login", creds, csrf="x" * 43)).status == 403
        assert (await post_form(p, "/login", creds, csrf=token, origin="http://evil.example")).status == 403
        r = await p.client.post("/login", data={**creds, "csrf": token}, allow_redirects=False)  # no Origin
        assert r.status == 403
        assert (await post_form(p, "/login", creds, csrf=token)).status == 303
        csrf = await page_csrf(p)
        assert csrf != token  # the session has its own token
        # A JSON API call: header token, Origin checked.
        body = {"name": "guard2", "role": "guard", "password": GUARD_PW}
        r = await p.client.post("/api/users", json=body, headers={"Origin": p.origin})
        assert r.status == 403 and (await r.json())["error"] == "csrf"
        r = await p.client.post("/api/users", json=body, headers={"Origin": p.origin, "X-CSRF-Token": "nope"})
        assert r.status == 403
        r = await p.client.post("/api/users", json=body, headers={"Origin": "http://127.0.0.1:1", "X-CSRF-Token": csrf})
        assert r.status == 403
        r = await p.client.post("/api/users", json=body, headers={"Origin": p.origin, "X-CSRF-Token": csrf})
        assert r.status == 201, await r.text()
        r = await p.client.post("/api/users", json=body, headers={"Origin": p.origin, "X-CSRF-Token": csrf})
        assert r.status == 409
        # A form post with the pre-sign-in token does not count once signed in.
        assert (await post_form(p, "/logout", {}, csrf=token)).status == 403
        r = await p.client.get("/console")
        assert r.status == 200


async def test_guard_cannot_open_admin_pages(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        await add_user(p, "guard1", "guard", GUARD_PW)
        assert (await sign_in(p, "guard1", GUARD_PW)).status == 303
        r = await p.client.get("/console")
        assert r.status == 200
        assert 'href="/users"' not in await r.text()
        csrf = await page_csrf(p)
        r = await p.client.get("/users", allow_redirects=False)
        assert r.status == 403
        assert "没有权限" in await r.text()
        r = await post_form(p, "/users", {"name": "x1", "role": "guard", "password": GUARD_PW}, csrf=csrf)
        assert r.status == 403
        r = await p.client.post(
            "/api/users",
            json={"name": "x2", "role": "guard", "password": GUARD_PW},
            headers={"Origin": p.origin, "X-CSRF-Token": csrf},
        )
        assert r.status == 403 and (await r.json())["error"] == "forbidden"


async def test_admin_creates_a_guard_who_must_change_the_password(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        await add_user(p, "boss", "admin", "admin-password-0001")
        assert (await sign_in(p, "boss", "admin-password-0001")).status == 303
        r = await p.client.get("/users")
        assert r.status == 200
        csrf = csrf_of(await r.text())
        r = await post_form(p, "/users", {"name": "guard7", "role": "guard", "password": "short"}, csrf=csrf)
        assert r.status == 400
        r = await post_form(p, "/users", {"name": "bad name", "role": "guard", "password": GUARD_PW}, csrf=csrf)
        assert r.status == 400
        r = await post_form(p, "/users", {"name": "root2", "role": "admin", "password": GUARD_PW}, csrf=csrf)
        assert r.status == 400
        r = await post_form(p, "/users", {"name": "guard7", "role": "guard", "password": GUARD_PW}, csrf=csrf)
        assert r.status == 200
        html = await r.text()
        assert "已创建用户 guard7" in html and '<tr data-user="guard7"' in html
        # Names are escaped on the page.
        r = await post_form(p, "/users", {"name": "<b>x", "role": "guard", "password": GUARD_PW}, csrf=csrf)
        assert r.status == 400 and "<b>x" not in await r.text()
        await post_form(p, "/logout", {}, csrf=csrf)
        r = await sign_in(p, "guard7", GUARD_PW)
        assert r.status == 303 and r.headers["Location"] == "/password"


async def test_logout_ends_the_session(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        await add_user(p, "guard1", "guard", GUARD_PW)
        await sign_in(p, "guard1", GUARD_PW)
        cookie = p.client.session.cookie_jar.filter_cookies(p.client.make_url("/"))["gh_session"].value
        jar_cookie = {"gh_session": cookie}
        csrf = await page_csrf(p)
        r = await post_form(p, "/logout", {}, csrf=csrf)
        assert r.status == 303 and r.headers["Location"] == "/login"
        # The old cookie value, replayed, opens nothing.
        p.client.session.cookie_jar.clear()
        r = await p.client.get("/console", allow_redirects=False, cookies=jar_cookie)
        assert r.status == 303 and r.headers["Location"].startswith("/login")
        r = await p.client.get("/api/events", cookies=jar_cookie)
        assert r.status == 401


async def test_session_idle_and_absolute_timeouts(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    cfg = write_config(tmp_path, None, extra="sessions: {idle_timeout_s: 600, absolute_timeout_s: 3600}\n")
    async with running_portal(cfg, Options(clock=lambda: now[0])) as p:
        await add_user(p, "guard1", "guard", GUARD_PW)
        await sign_in(p, "guard1", GUARD_PW)
        for _ in range(7):  # active use keeps it alive up to the absolute limit
            now[0] += 500
            r = await p.client.get("/api/events")
            assert r.status == 200
            await p.services.store.flush()
        now[0] += 101  # 3601 s after sign-in, 101 s after the last request
        assert (await p.client.get("/api/events")).status == 401
        await sign_in(p, "guard1", GUARD_PW)
        now[0] += 601  # idle too long
        assert (await p.client.get("/api/events")).status == 401


async def test_api_errors_are_json_and_bodies_are_capped(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None, extra="max_body_bytes: 4096\n")) as p:
        await add_user(p, "boss", "admin", "admin-password-0001")
        await sign_in(p, "boss", "admin-password-0001")
        csrf = await page_csrf(p)
        h = {"Origin": p.origin, "X-CSRF-Token": csrf, "Content-Type": "application/json"}
        r = await p.client.post("/api/users", data=b'{"name": ', headers=h)
        assert r.status == 400 and (await r.json())["error"] == "bad-request"
        r = await p.client.post("/api/users", data=b"[1, 2]", headers=h)
        assert r.status == 400
        r = await p.client.post("/api/users", data=b'{"name": "' + b"x" * 10_000 + b'"}', headers=h)
        assert r.status == 413 and "error" in await r.json()
        for q in ["limit=0", "limit=501", "limit=x", "after_seq=3", "before=a&after=b"]:
            r = await p.client.get(f"/api/events?{q}")
            assert r.status == 400, q
            assert (await r.json())["error"] == "bad-request"
        r = await p.client.get("/api/nothing-here")
        assert r.status == 404 and (await r.json())["error"] == "not-found"
        r = await p.client.get("/no-such-page")
        assert r.status == 404 and "页面不存在" in await r.text()


async def test_pages_escape_and_send_security_headers(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        r = await p.client.get("/login?next=%22%3E%3Cscript%3Ealert(1)%3C/script%3E")
        html = await r.text()
        assert "<script>alert" not in html
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        r = await sign_in(p, "<script>", "x" * 12)
        assert r.status == 401 and "<script>" not in await r.text()
        # An off-site next= is not followed after sign-in.
        await add_user(p, "guard1", "guard", GUARD_PW)
        page = await p.client.get("/login")
        r = await post_form(
            p,
            "/login",
            {"user": "guard1", "password": GUARD_PW, "next": "//evil.example/x"},
            csrf=csrf_of(await page.text()),
        )
        assert r.headers["Location"] == "/console"


async def test_language_switch_cookie(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        r = await p.client.get("/login")
        assert "登录" in await r.text()
        r = await p.client.get("/lang/en?next=/login", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/login"
        r = await p.client.get("/login")
        assert "Sign in" in await r.text() and "登录" not in await r.text()
        r = await p.client.get("/lang/fr?next=/login", allow_redirects=False)
        assert r.status == 404


def test_adduser_command_and_config_errors(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, None)
    pw = tmp_path / "pw"
    pw.write_text(GUARD_PW + "\n")
    cmd = [
        sys.executable,
        "-m",
        "portal",
        "adduser",
        "--config",
        str(cfg),
        "--user",
        "guard9",
        "--role",
        "guard",
        "--password-file",
        str(pw),
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"user": "guard9"' in r.stdout and GUARD_PW not in r.stdout + r.stderr
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "exists" in r.stderr
    pw.write_text("short\n")
    r = subprocess.run([*cmd[:7], "guard10", *cmd[8:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "12" in r.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {host: 127.0.0.1, prot: 8080}\n")
    with pytest.raises(ConfigError) as e:
        load(bad)
    assert str(bad) in str(e.value) and "prot" in str(e.value) and ":1" in str(e.value)
    bad.write_text("gateways:\n  - {site: s1, gateway: gw1}\n  - {site: s1, gateway: gw1}\n")
    with pytest.raises(ConfigError, match="listed twice"):
        load(bad)
    bad.write_text("timezone: Mars/Olympus\n")
    with pytest.raises(ConfigError, match="time zone"):
        load(bad)
    r = subprocess.run(
        [sys.executable, "-m", "portal", "run", "--config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr


def test_run_on_a_busy_port_fails_clearly_and_still_hands_out_the_admin_password(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = write_config(tmp_path, None, port=s.getsockname()[1])
        r = subprocess.run(
            [sys.executable, "-m", "portal", "run", "--config", str(cfg)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1 and "address already in use" in r.stderr and "Traceback" not in r.stderr
    first = json.loads(r.stdout.splitlines()[0])["first_admin"]
    password = Path(first["password_file"]).read_text().strip()
    assert first["user"] == "admin" and len(password) >= 12
    assert password not in r.stderr and password not in r.stdout


@pytest.mark.parametrize("secure", [False, True])
async def test_session_cookie_flags(tmp_path: Path, secure: bool) -> None:
    cfg = write_config(tmp_path, None, extra=f"cookie_secure: {str(secure).lower()}\n")
    async with running_portal(cfg) as p:
        await add_user(p, "guard1", "guard", GUARD_PW)
        page = await p.client.get("/login")
        origin = p.origin.replace("http:", "https:") if secure else p.origin
        pre = page.cookies["gh_csrf"]
        assert bool(pre["secure"]) is secure and pre["samesite"] == "Strict"
        # (A client on plain http does not send Secure cookies back by itself: hand it over as a browser on TLS would.)
        form = {"user": "guard1", "password": GUARD_PW, "csrf": csrf_of(await page.text())}
        r = await p.client.post(
            "/login", data=form, headers={"Origin": origin}, cookies={"gh_csrf": pre.value}, allow_redirects=False
        )
        assert r.status == 303
        morsel = r.cookies["gh_session"]
        assert morsel["httponly"] is True and morsel["samesite"] == "Lax" and morsel["path"] == "/"
        assert bool(morsel["secure"]) is secure
        assert len(morsel.value) >= 43  # 256 random bits, url-safe base64
