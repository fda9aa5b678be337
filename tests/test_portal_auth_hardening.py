"""Passwords and sessions to OWASP ASVS 4.0 L2: argon2id cost and rehash, length rules, no account
enumeration, failed sign-in locks per user+address / address / user name, the audit trail of it, and
session ids (fixation, timeouts, sign-out, password change, cookie flags) for staff and residents.

A real portal on loopback with a real SQLite store. Each client connects from its own loopback address
(127.x.y.z), or, for addresses loopback cannot have (IPv6 networks), through the trusted proxy 127.0.0.1
with X-Forwarded-For. Only the clocks are fake.
"""

from __future__ import annotations

import hashlib
import logging
import re
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from argon2 import PasswordHasher

from portal.app import Options
from portal.config import ConfigError, load
from portal.estate import registry as reg
from portal.estate.service import RESIDENT_ABSOLUTE_S, RESIDENT_IDLE_S
from portal.store import audit, get_user, insert_user
from portal.web.auth import MAX_PASSWORD, AuthError, KnownAddresses, LockTable, address_key, check_new_password
from tests.portal_support import Portal, add_user, devices, running_portal, write_config
from tests.registry_support import estate, estate_csv

PROXY = "trusted_proxies: ['127.0.0.1']\n"
ALICE_PW = "alice-password-0001"
BOB_PW = "bob-password-00001"
CAROL_PW = "carol-password-0001"
WRONG = "not-her-password-1"
ZHANG = "13812345678"  # an owner in estate_csv()
LI = "13987654321"
RESIDENT_PW = "zhangwei-2026"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def audit_rows(p: Portal) -> list[dict[str, Any]]:
    await p.services.store.flush()
    return await p.services.store.read(lambda c: [dict(r) for r in c.execute("SELECT * FROM audit ORDER BY id")])


async def row_exists(p: Portal, table: str, token: str) -> bool:
    await p.services.store.flush()
    return bool(
        await p.services.store.read(
            lambda c: c.execute(f"SELECT count(*) FROM {table} WHERE id_hash = ?", (sha(token),)).fetchone()[0]
        )
    )


async def stored_hash(p: Portal, name: str) -> str:
    user = await p.services.store.read(lambda c: get_user(c, name))
    assert user is not None
    return user.password_hash


TOKENS = re.compile(r'(<meta name="csrf-token" content="|name="csrf" value=")[^"]+"')


def without_name(body: str, name: str) -> str:
    """The page with the name the user typed (echoed in the form) and each browser's CSRF token blanked."""
    return TOKENS.sub(r'\1TOKEN"', body.replace(f'value="{name}"', 'value="NAME"'))


# ---------------------------------------------------------------- 1. argon2id cost


async def test_hashes_carry_the_configured_cost_and_old_ones_are_redone_at_sign_in(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p, devices(p) as new:
        cfg = p.services.cfg.auth
        assert (cfg.argon2_memory_kib, cfg.argon2_time_cost, cfg.argon2_parallelism) == (47104, 2, 1)
        await add_user(p, "alice", "guard", ALICE_PW)
        assert (await stored_hash(p, "alice")).startswith("$argon2id$v=19$m=47104,t=2,p=1$")
        # A user stored before this cost was chosen (argon2-cffi's defaults then: 64 MiB, t=3, p=4).
        old = PasswordHasher().hash(BOB_PW)
        assert old.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
        await p.services.store.run_write(lambda c: insert_user(c, "bob", "guard", old, False))
        d = new("127.0.9.1")
        assert (await d.sign_in("bob", WRONG)).status == 401
        assert await stored_hash(p, "bob") == old  # a failure never rewrites anything
        assert (await d.sign_in("bob", BOB_PW)).status == 303
        redone = await stored_hash(p, "bob")
        assert redone != old and redone.startswith("$argon2id$v=19$m=47104,t=2,p=1$")
        assert PasswordHasher().verify(redone, BOB_PW)
        rows = [r for r in await audit_rows(p) if r["action"] == "signin"]
        assert rows[-1]["actor"] == "guard:bob" and rows[-1]["detail"] == "rehashed"
        assert (await new("127.0.9.2").sign_in("bob", BOB_PW)).status == 303
        assert await stored_hash(p, "bob") == redone  # already at the cost: left alone
    # The office raises the cost; each stored hash follows at its user's next sign-in.
    write_config(tmp_path, None, extra="auth: {argon2_memory_kib: 19456, argon2_time_cost: 3}\n")
    async with running_portal(tmp_path / "portal.yaml") as p, devices(p) as new:
        assert (await new("127.0.9.3").sign_in("bob", BOB_PW)).status == 303
        assert (await stored_hash(p, "bob")).startswith("$argon2id$v=19$m=19456,t=3,p=1$")
        assert (await stored_hash(p, "alice")).startswith("$argon2id$v=19$m=47104,t=2,p=1$")


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ("{argon2_memory_kib: 4096}", "argon2_memory_kib"),
        ("{argon2_memory_kib: 8192, argon2_time_cost: 1}", "argon2 cost too low"),
        ("{argon2_time_cost: 0}", "argon2_time_cost"),
        ("{argon2_parallelism: 64}", "argon2_parallelism"),
        ("{max_failures_user_address: 1}", "max_failures_user_address"),
        ("{failure_window_s: 3600, lock_max_s: 600}", "lock_max_s is below"),
        ("{argon2_salt: 1}", "argon2_salt"),
    ],
)
def test_auth_config_is_bounded(tmp_path: Path, auth: str, message: str) -> None:
    bad = tmp_path / "portal.yaml"
    bad.write_text(f"auth: {auth}\n")
    with pytest.raises(ConfigError, match=message) as e:
        load(bad)
    assert str(bad) in str(e.value)


# ---------------------------------------------------------------- 2. password rules


def test_password_rules_are_length_only_and_not_the_user_name() -> None:
    for pw in ["a" * 12, "abcdefghijkl", "密码密码密码密码密码密码", "            x", "x" * MAX_PASSWORD]:
        check_new_password(pw, "alice")  # no composition rules, any characters
    for pw, name, key in [
        ("a" * 11, "", "password.too_short"),
        ("x" * (MAX_PASSWORD + 1), "", "password.too_long"),
        ("guard.office1", "guard.office1", "password.is_name"),
        ("Guard.Office1", "guard.office1", "password.is_name"),
    ]:
        with pytest.raises(AuthError) as e:
            check_new_password(pw, name)
        assert e.value.key == key


async def test_password_rules_at_the_user_form_the_api_and_the_password_change(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p, devices(p) as new:
        await add_user(p, "boss", "admin", "admin-password-0001")
        d = new()
        assert (await d.sign_in("boss", "admin-password-0001")).status == 303
        csrf = await d.csrf("/console")
        for password, error in [("guard.office1", "is-name"), ("x" * 1025, "too-long"), ("x" * 11, "too-short")]:
            r = await d.http.post(
                "/api/users",
                json={"name": "guard.office1", "role": "guard", "password": password},
                headers={**d.headers(), "X-CSRF-Token": csrf},
            )
            assert r.status == 400 and (await r.json())["error"] == error, password
        r = await d.post("/users", {"name": "guard.office1", "role": "guard", "password": "GUARD.OFFICE1"}, csrf=csrf)
        assert r.status == 400 and "密码不能与用户名相同" in await r.text()

        long_pw = "长" * 1024  # the full length counts: nothing is cut off
        await add_user(p, "guard.office1", "guard", "twelve chars")
        g = new()
        assert (await g.sign_in("guard.office1", "twelve chars")).status == 303
        gcsrf = await g.csrf("/password")
        for form, status, text in [
            ({"new": "guard.office1"}, 400, "密码不能与用户名相同"),
            ({"new": "x" * 1025}, 400, "最多 1024 个字符"),
            ({"new": "short"}, 400, "至少需要 12 个字符"),
            ({"new": long_pw}, 303, ""),
        ]:
            r = await g.post("/password", {"current": "twelve chars", "confirm": form["new"], **form}, csrf=gcsrf)
            assert r.status == status, form["new"][:20]
            assert text in await r.text()
        assert (await new().sign_in("guard.office1", long_pw[:-1])).status == 401
        assert (await new().sign_in("guard.office1", long_pw)).status == 303


# ---------------------------------------------------------------- 3. no account enumeration


async def test_unknown_user_and_wrong_password_answer_alike_in_bytes_and_time(tmp_path: Path) -> None:
    # Locks out of the way for this one: it compares the plain failures (the lock tests compare locked answers).
    extra = "auth: {max_failures_user_address: 1000, max_failures_address: 1000, max_failures_user: 1000}\n"
    async with running_portal(write_config(tmp_path, None, extra=extra)) as p, devices(p) as new:
        await add_user(p, "alice1", "guard", ALICE_PW)
        d = new()
        csrf = await d.csrf()  # one browser: the same pre-sign-in token in every answer
        times: dict[str, list[float]] = {"alice1": [], "alicx1": []}
        answers: dict[str, list[tuple[int, dict[str, str], str]]] = {"alice1": [], "alicx1": []}
        for i in range(12):
            for name in ("alice1", "alicx1") if i % 2 else ("alicx1", "alice1"):
                t0 = time.perf_counter()
                r = await d.post("/login", {"user": name, "password": WRONG, "next": "/console"}, csrf=csrf)
                body = await r.text()
                times[name].append(time.perf_counter() - t0)
                headers = {k: v for k, v in r.headers.items() if k != "Date"}
                answers[name].append((r.status, headers, without_name(body, name)))
        for name in times:
            del times[name][:2]  # warm-up
        known, unknown = answers["alice1"], answers["alicx1"]
        assert known[0][0] == 401 and "用户名或密码错误" in known[0][2]
        for a in known + unknown:  # status, headers and body, byte for byte
            assert a == known[0]
        m_known, m_unknown = statistics.median(times["alice1"]), statistics.median(times["alicx1"])
        assert abs(m_known - m_unknown) / max(m_known, m_unknown) < 0.35, (m_known, m_unknown)
        assert m_unknown > 0.01  # the unknown name really had a hash checked (about 90 ms here)


# ---------------------------------------------------------------- 4. failed sign-in locks (and 5. their audit)


async def test_a_user_guessed_from_one_address_is_locked_there_only_and_the_lock_expires_and_doubles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    now = [1000.0]
    async with running_portal(write_config(tmp_path, None), Options(monotonic=lambda: now[0])) as p, devices(p) as new:
        await add_user(p, "alice", "guard", ALICE_PW)
        a, b, c = new("127.0.1.1"), new("127.0.1.2"), new("127.0.1.3")
        for i in range(10):
            assert (await a.sign_in("alice", f"{WRONG}-{i}")).status == 401
        # (a) the right password from A now gets "try later", as does an unknown name locked the same way.
        r = await a.sign_in("alice", ALICE_PW)
        assert r.status == 429 and r.headers["Retry-After"] == "900"
        locked_alice = without_name(await r.text(), "alice")
        assert "失败次数过多，请稍后再试" in locked_alice and a.cookie("gh_session") is None
        for i in range(10):
            assert (await c.sign_in("alicx", f"{WRONG}-{i}")).status == 401
        r = await c.sign_in("alicx", ALICE_PW)
        assert r.status == 429 and r.headers["Retry-After"] == "900"
        assert without_name(await r.text(), "alicx") == locked_alice
        assert (await a.sign_in("alice", ALICE_PW)).status == 429
        # (b) alice from another address, even one she never used, is not held up.
        assert (await b.sign_in("alice", ALICE_PW)).status == 303 and await b.signed_in()
        # (d) the lock ends with the clock ...
        now[0] += 899
        assert (await a.sign_in("alice", ALICE_PW)).status == 429
        now[0] += 2
        assert (await a.sign_in("alice", ALICE_PW)).status == 303 and await a.signed_in()
        # ... and the next lock of the same user+address lasts twice as long.
        a2 = new("127.0.1.1")
        for i in range(10):
            assert (await a2.sign_in("alice", f"{WRONG}-{i}")).status == 401
        r = await a2.sign_in("alice", ALICE_PW)
        assert r.status == 429 and r.headers["Retry-After"] == "1800"
        now[0] += 1000
        assert (await a2.sign_in("alice", ALICE_PW)).status == 429
        now[0] += 801
        assert (await a2.sign_in("alice", ALICE_PW)).status == 303

        # 5. every success, failure, lock and first refusal is in the audit chain; no password anywhere.
        rows = await audit_rows(p)
        mine = [(r["action"], r["remote"], r["detail"]) for r in rows if r["actor"] == "guard:alice"]
        assert mine.count(("signin.failed", "127.0.1.1", "wrong password")) == 20
        locks = [m for m in mine if m[0] == "signin.lock"]
        assert locks == [
            ("signin.lock", "127.0.1.1", "user+address locked for 900 s"),
            ("signin.lock", "127.0.1.1", "user+address locked for 1800 s"),
        ]
        refused = [m for m in mine if m[0] == "signin.refused"]
        assert len(refused) == 2 and all(m[1] == "127.0.1.1" for m in refused)  # one per lock, not per attempt
        assert [m[1] for m in mine if m[0] == "signin"] == ["127.0.1.2", "127.0.1.1", "127.0.1.1"]
        unknown = [r for r in rows if r["actor"] == "unknown"]
        assert len(unknown) == 12 and {r["remote"] for r in unknown} == {"127.0.1.3"}
        assert {r["target"] for r in unknown} == {f"name-sha256:{sha('alicx')[:16]}"}
        assert "alicx" not in str(rows)  # an unknown name may be a password typed in the wrong box
        secrets_used = [ALICE_PW, WRONG]
        assert not any(s in str(rows) for s in secrets_used)
        assert not any(s in caplog.text for s in secrets_used)
        assert (await p.services.store.read(audit.verify)).ok


async def test_an_address_spraying_many_user_names_is_locked_as_an_address(tmp_path: Path) -> None:
    now = [1000.0]
    async with running_portal(write_config(tmp_path, None), Options(monotonic=lambda: now[0])) as p, devices(p) as new:
        await add_user(p, "bob", "guard", BOB_PW)
        await add_user(p, "carol", "guard", CAROL_PW)
        x = new("127.0.2.7")
        assert (await x.sign_in("carol", CAROL_PW)).status == 303  # carol works at this address
        x = new("127.0.2.7")
        for i in range(19):
            assert (await x.sign_in(f"user{i:02d}", WRONG)).status == 401
        assert (await x.sign_in("bob", WRONG)).status == 401  # the 20th name
        # (c) the address is locked for every name it has not signed in to ...
        for name, pw in [("bob", BOB_PW), ("user99", WRONG)]:
            r = await x.sign_in(name, pw)
            assert r.status == 429 and r.headers["Retry-After"] == "900", name
        # ... but not for carol, who signed in here before, nor for anyone elsewhere.
        assert (await new("127.0.2.7").sign_in("carol", CAROL_PW)).status == 303
        assert (await new("127.0.2.8").sign_in("bob", BOB_PW)).status == 303
        # (d) and it ends with the clock.
        now[0] += 901
        assert (await new("127.0.2.7").sign_in("bob", BOB_PW)).status == 303
        locks = [r for r in await audit_rows(p) if r["action"] == "signin.lock"]
        assert [(r["remote"], r["detail"]) for r in locks] == [("127.0.2.7", "address locked for 900 s")]


async def test_many_addresses_cannot_lock_a_user_out_of_her_known_address(tmp_path: Path) -> None:
    now = [1000.0]
    async with running_portal(write_config(tmp_path, None), Options(monotonic=lambda: now[0])) as p, devices(p) as new:
        await add_user(p, "alice", "guard", ALICE_PW)
        assert (await new("127.0.3.2").sign_in("alice", ALICE_PW)).status == 303  # her guardroom PC
        # (e) a botnet: 30 addresses, one guess each, then more.
        for i in range(30):
            assert (await new(f"127.0.100.{i + 1}").sign_in("alice", f"{WRONG}-{i}")).status == 401
        r = await new("127.0.100.200").sign_in("alice", ALICE_PW)
        assert r.status == 429 and r.headers["Retry-After"] == "900"  # the name is locked for strange addresses
        assert (await new("127.0.4.5").sign_in("alice", ALICE_PW)).status == 429  # (alice travelling, too)
        # Her own address still works, even after a typo of her own.
        home = new("127.0.3.2")
        assert (await home.sign_in("alice", WRONG)).status == 401
        assert (await home.sign_in("alice", ALICE_PW)).status == 303 and await home.signed_in()
        locks = [(r["remote"], r["detail"]) for r in await audit_rows(p) if r["action"] == "signin.lock"]
        assert locks == [("127.0.100.30", "user locked for 900 s")]


async def test_the_address_is_the_client_behind_the_trusted_proxy_and_ipv6_counts_by_64(tmp_path: Path) -> None:
    now = [1000.0]
    cfg = write_config(tmp_path, None, extra=PROXY)
    async with running_portal(cfg, Options(monotonic=lambda: now[0])) as p, devices(p) as new:
        await add_user(p, "bob", "guard", BOB_PW)
        # Hopping within one IPv6 /64 (one subscriber's network) does not escape the address lock.
        for i in range(20):
            assert (await new(f"2001:db8:1:2::{i + 1:x}").sign_in(f"v6user{i}", WRONG)).status == 401
        assert (await new("2001:db8:1:2::beef").sign_in("bob", BOB_PW)).status == 429
        assert (await new("2001:db8:1:3::1").sign_in("bob", BOB_PW)).status == 303
        # A peer that is not the proxy cannot pick its address by writing X-Forwarded-For.
        liar = new("127.0.5.5")
        for i in range(20):
            assert (await liar.sign_in(f"liar{i}", WRONG, addr=f"203.0.113.{i + 1}")).status == 401
        assert (await liar.sign_in("bob", BOB_PW, addr="203.0.113.99")).status == 429
        assert (await new("203.0.113.99").sign_in("bob", BOB_PW)).status == 303  # (via the proxy: a real client)
        rows = [r for r in await audit_rows(p) if r["action"] in ("signin.failed", "signin.lock")]
        assert {r["remote"] for r in rows} == {*(f"2001:db8:1:2::{i + 1:x}" for i in range(20)), "127.0.5.5"}
        assert [(r["remote"], r["detail"]) for r in rows if r["action"] == "signin.lock"] == [
            ("2001:db8:1:2::14", "address locked for 900 s"),
            ("127.0.5.5", "address locked for 900 s"),
        ]


def test_lock_tables_and_known_addresses_stay_bounded() -> None:
    now = [0.0]
    t = LockTable(limit=3, window_s=900, lock_max_s=3000, clock=lambda: now[0], max_keys=100)
    for i in range(5000):
        t.fail(f"name{i}|198.51.100.{i % 250}")
    assert len(t) == 100
    for _ in range(3):
        t.fail("hot")
    assert t.lock_left("hot") == 900
    for i in range(99):
        t.fail(f"late{i}")
    assert t.lock_left("hot") == 900  # the least recently used went first, not the lock just used
    now[0] += 900
    assert t.lock_left("hot") == 0
    for _ in range(3):
        t.fail("hot")
    assert t.lock_left("hot") == 1800
    now[0] += 1800
    for _ in range(3):
        t.fail("hot")
    assert t.lock_left("hot") == 3000  # doubling stops at lock_max_s
    now[0] += 3000 + 3001  # quiet for lock_max_s after the lock: forgiven, and forgotten
    size = len(t)
    assert t.lock_left("hot") == 0 and len(t) == size - 1
    known = KnownAddresses(ttl_s=60, clock=lambda: now[0], max_keys=50)
    for i in range(500):
        known.add(f"u{i}|10.0.0.1")
    assert len(known) == 50 and "u499|10.0.0.1" in known and "u0|10.0.0.1" not in known
    now[0] += 61
    assert "u499|10.0.0.1" not in known
    assert address_key("2001:db8:1:2::beef") == "2001:db8:1:2::/64" == address_key("2001:db8:1:2:ffff::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1" and address_key("?") == "?"


# ---------------------------------------------------------------- 6. staff sessions


async def test_sign_in_issues_a_new_session_id_and_never_keeps_a_planted_one(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p, devices(p) as new:
        await add_user(p, "alice", "guard", ALICE_PW)
        await add_user(p, "mallory", "guard", BOB_PW)
        victim = new()
        planted = "A" * 43
        victim.plant("gh_session", planted)
        r = await victim.sign_in("alice", ALICE_PW)
        assert r.status == 303
        issued = r.cookies["gh_session"].value
        assert issued != planted and await row_exists(p, "sessions", issued)
        assert not await row_exists(p, "sessions", planted)
        # A real session planted by an attacker (mallory's own) is replaced and deleted at sign-in.
        m = new()
        assert (await m.sign_in("mallory", BOB_PW)).status == 303
        stolen = m.cookie("gh_session")
        assert stolen and await m.signed_in()
        victim2 = new()
        victim2.plant("gh_session", stolen)
        r = await victim2.sign_in("alice", ALICE_PW)
        assert r.status == 303 and r.cookies["gh_session"].value not in (stolen, issued)
        assert not await row_exists(p, "sessions", stolen) and not await m.signed_in()
        r = await victim2.get("/api/events")
        assert r.status == 200


async def test_idle_and_absolute_timeouts_end_the_session_on_the_server(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    cfg = write_config(tmp_path, None, extra="sessions: {idle_timeout_s: 600, absolute_timeout_s: 3600}\n")
    async with running_portal(cfg, Options(clock=lambda: now[0])) as p, devices(p) as new:
        await add_user(p, "alice", "guard", ALICE_PW)
        d = new()
        await d.sign_in("alice", ALICE_PW)
        token = d.cookie("gh_session")
        assert token
        now[0] += 599
        assert await d.signed_in()
        await p.services.store.flush()
        now[0] += 601  # idle: 601 s since the last request
        assert not await d.signed_in()
        assert not await row_exists(p, "sessions", token)
        d2 = new()
        await d2.sign_in("alice", ALICE_PW)
        token = d2.cookie("gh_session")
        assert token
        for _ in range(7):
            now[0] += 500
            assert await d2.signed_in()
            await p.services.store.flush()
        now[0] += 101  # active all along, but 3601 s since sign-in
        assert not await d2.signed_in()
        assert not await row_exists(p, "sessions", token)


async def test_sign_out_deletes_the_session_so_its_cookie_replays_to_nothing(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p, devices(p) as new:
        await add_user(p, "alice", "guard", ALICE_PW)
        d = new()
        await d.sign_in("alice", ALICE_PW)
        token = d.cookie("gh_session")
        assert token and await row_exists(p, "sessions", token)
        r = await d.post("/logout", {}, csrf=await d.csrf("/console"))
        assert r.status == 303 and r.headers["Location"] == "/login"
        assert not await row_exists(p, "sessions", token)
        replay = new()
        replay.plant("gh_session", token)
        assert not await replay.signed_in()
        assert [r["actor"] for r in await audit_rows(p) if r["action"] == "signout"] == ["guard:alice"]


async def test_a_password_change_ends_the_users_other_sessions(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p, devices(p) as new:
        await add_user(p, "alice", "guard", ALICE_PW)
        await add_user(p, "bob", "guard", BOB_PW)
        d1, d2, other = new(), new(), new()
        for d, user, pw in [(d1, "alice", ALICE_PW), (d2, "alice", ALICE_PW), (other, "bob", BOB_PW)]:
            assert (await d.sign_in(user, pw)).status == 303
        old = d1.cookie("gh_session")
        assert old
        new_pw = "alice-new-password-2"
        r = await d1.post(
            "/password", {"current": ALICE_PW, "new": new_pw, "confirm": new_pw}, csrf=await d1.csrf("/password")
        )
        assert r.status == 303
        assert r.cookies["gh_session"].value != old and await d1.signed_in()
        assert not await d2.signed_in() and not await row_exists(p, "sessions", old)
        assert await other.signed_in()  # other users keep theirs
        rows = await p.services.store.read(
            lambda c: c.execute(
                "SELECT count(*) FROM sessions s JOIN users u ON u.id = s.user_id WHERE u.name = 'alice'"
            ).fetchone()[0]
        )
        assert rows == 1
        assert [r["actor"] for r in await audit_rows(p) if r["action"] == "password.change"] == ["guard:alice"]


async def test_wrong_current_passwords_at_a_password_change_are_locked_like_sign_ins(tmp_path: Path) -> None:
    now = [1000.0]
    async with running_portal(write_config(tmp_path, None), Options(monotonic=lambda: now[0])) as p, devices(p) as new:
        await add_user(p, "alice", "guard", ALICE_PW)
        d = new()
        await d.sign_in("alice", ALICE_PW)
        csrf = await d.csrf("/password")
        form = {"current": WRONG, "new": "alice-new-password-2", "confirm": "alice-new-password-2"}
        for _ in range(10):
            assert (await d.post("/password", form, csrf=csrf)).status == 400
        r = await d.post("/password", {**form, "current": ALICE_PW}, csrf=csrf)
        assert r.status == 429 and r.headers["Retry-After"] == "900"
        assert await d.signed_in()  # (the session itself stays)


def set_cookie(r: ClientResponse, name: str) -> str:
    lines = [v for v in r.headers.getall("Set-Cookie", ()) if v.startswith(f"{name}=")]
    assert len(lines) == 1, r.headers.getall("Set-Cookie", ())
    return lines[0]


@pytest.mark.parametrize("secure", [False, True])
async def test_cookie_flags_in_the_set_cookie_headers(tmp_path: Path, secure: bool) -> None:
    cfg = write_config(tmp_path, None, extra=f"cookie_secure: {str(secure).lower()}\n")
    async with running_portal(cfg) as p, devices(p) as new:
        await load_estate(p)
        await set_resident_password(p, ZHANG)
        await add_user(p, "alice", "guard", ALICE_PW)
        origin = p.origin.replace("http:", "https:") if secure else p.origin

        async def sign_in(page_path: str, path: str, form: dict[str, str]) -> tuple[str, ClientResponse]:
            d = new()
            pre = set_cookie(await d.http.get(page_path), "gh_csrf")
            token = pre.split(";", 1)[0].split("=", 1)[1]
            # (A plain-http client keeps Secure cookies to itself: hand the token over as a browser on TLS would.)
            r = await d.http.post(
                path,
                data={**form, "csrf": token},
                headers={"Origin": origin},
                cookies={"gh_csrf": token},
                allow_redirects=False,
            )
            assert r.status == 303, (path, r.status)
            return pre, r

        pre, r = await sign_in("/login", "/login", {"user": "alice", "password": ALICE_PW})
        _, r2 = await sign_in("/m/login", "/m/login", {"phone": ZHANG, "password": RESIDENT_PW})
        for line, samesite in [
            (pre, "Strict"),
            (set_cookie(r, "gh_session"), "Lax"),
            (set_cookie(r2, "gh_resident"), "Lax"),
        ]:
            attrs = {a.strip().split("=", 1)[0].lower(): a.strip() for a in line.split(";")[1:]}
            assert "httponly" in attrs, line
            assert attrs["samesite"] == f"SameSite={samesite}", line
            assert attrs["path"] == "Path=/", line
            assert ("secure" in attrs) is secure, line
            assert "domain" not in attrs, line  # host-only


# ---------------------------------------------------------------- 6. resident (phone) sessions


async def load_estate(p: Portal) -> None:
    rows, errors = reg.parse_import(estate_csv().encode())
    assert not errors
    await p.services.store.run_write(lambda c: reg.apply_import(c, rows, "test"))


async def set_resident_password(p: Portal, phone: str, password: str = RESIDENT_PW) -> None:
    h = await estate(p).hash_password(password)
    n = await p.services.store.run_write(
        lambda c: c.execute("UPDATE reg_people SET password_hash = ? WHERE phone = ?", (h, phone)).rowcount
    )
    assert n == 1


async def test_resident_sign_in_fixation_sign_out_and_password_change(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p, devices(p) as new:
        await load_estate(p)
        await set_resident_password(p, ZHANG)
        await set_resident_password(p, LI, "lina-password-1")
        # Fixation: neither a made-up value nor another resident's live session survives a sign-in.
        mallory = new()
        assert (await mallory.resident_sign_in(LI, "lina-password-1")).status == 303
        stolen = mallory.cookie("gh_resident")
        assert stolen and await mallory.resident_signed_in()
        for planted in ["B" * 43, stolen]:
            victim = new()
            victim.plant("gh_resident", planted)
            r = await victim.resident_sign_in(ZHANG, RESIDENT_PW)
            assert r.status == 303 and r.headers["Location"] == "/m"
            issued = r.cookies["gh_resident"].value
            assert issued != planted and await row_exists(p, "resident_sessions", issued)
            assert not await row_exists(p, "resident_sessions", planted)
        assert not await mallory.resident_signed_in()
        # Sign-out deletes the row; the cookie replayed opens nothing.
        d = new()
        await d.resident_sign_in(ZHANG, RESIDENT_PW)
        token = d.cookie("gh_resident")
        assert token and await d.resident_signed_in()
        r = await d.post("/m/logout", {})
        assert r.status == 303 and not await row_exists(p, "resident_sessions", token)
        replay = new()
        replay.plant("gh_resident", token)
        assert not await replay.resident_signed_in()
        # A password change ends the resident's other sessions.
        d1, d2 = new(), new()
        await d1.resident_sign_in(ZHANG, RESIDENT_PW)
        await d2.resident_sign_in(ZHANG, RESIDENT_PW)
        old = d1.cookie("gh_resident")
        assert old
        r = await d1.post(
            "/m/password", {"current": RESIDENT_PW, "new": "zhangwei-2027", "confirm": "zhangwei-2027", "next": "/m"}
        )
        assert r.status == 303 and r.cookies["gh_resident"].value != old
        assert await d1.resident_signed_in() and not await d2.resident_signed_in()
        # Failures and sign-outs are audited, the number masked, no password.
        assert (await new().resident_sign_in(ZHANG, WRONG)).status == 401
        rows = await audit_rows(p)
        failed = [(r["actor"], r["action"], r["target"], r["detail"]) for r in rows if r["action"] == "signin.failed"]
        assert failed == [("public", "signin.failed", "phone:138****5678", "wrong secret")]
        assert sum(r["action"] == "signout" and r["actor"].startswith("resident:") for r in rows) == 1
        assert not any(s in str(rows) for s in (RESIDENT_PW, WRONG, ZHANG))


async def test_resident_sessions_end_on_the_server_after_idle_and_absolute_timeouts(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    async with running_portal(write_config(tmp_path, None), Options(clock=lambda: now[0])) as p, devices(p) as new:
        await load_estate(p)
        await set_resident_password(p, ZHANG)
        d = new()
        await d.resident_sign_in(ZHANG, RESIDENT_PW)
        token = d.cookie("gh_resident")
        assert token
        now[0] += RESIDENT_IDLE_S - 60
        assert await d.resident_signed_in()
        await p.services.store.flush()
        now[0] += RESIDENT_IDLE_S + 1
        assert not await d.resident_signed_in() and not await row_exists(p, "resident_sessions", token)
        d2 = new()
        await d2.resident_sign_in(ZHANG, RESIDENT_PW)
        token = d2.cookie("gh_resident")
        assert token
        step = RESIDENT_IDLE_S - 86400  # used every 13 days: never idle ...
        for _ in range(RESIDENT_ABSOLUTE_S // step):
            now[0] += step
            assert await d2.resident_signed_in()
            await p.services.store.flush()
        now[0] += step  # ... but past the absolute limit
        assert not await d2.resident_signed_in() and not await row_exists(p, "resident_sessions", token)
