"""Residents' accounts played as their attackers (issue 14, items 1-4), against a real portal process on loopback
with its own SQLite store, each client from its own loopback address (or an IPv6 one through the trusted proxy):

* "I live here" with a resident's phone number sets, replaces, tests and reveals nothing of their account;
* a known number and a new one get the same answer, byte for byte, at the same cost;
* one limiter (per number, per address, IPv6 per /64) for every check of a resident's secret;
* a password chosen in a request reaches no house someone else links the number to (account pre-hijacking);
* a moved-out resident who comes back gets a new subject, and the old one stays on the signed revocation list,
  whether the new request is rejected or approved, and whichever way the office brings them back.

Clock-bound rules (re-authentication, the password change after a one-time code, the 30-day session) run on an
in-process portal whose wall clock the test moves; a headless Chromium at a phone's size shows the changed pages.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse
from playwright.async_api import async_playwright, expect

from gateway.wire.passes import RevocationList, keyring, load_public_key, parse_revocations
from portal.app import Options
from portal.estate import phone as phone_pages
from portal.estate import registry as reg
from portal.estate.passes_issue import PUBLIC_KEY_FILE
from portal.estate.service import REAUTH_S, RESIDENT_ABSOLUTE_S
from portal.store import SCHEMA_VERSION, connect, migrate
from portal.store.schema import steps
from tests.portal_support import (
    ROOT,
    Device,
    PortalProcess,
    devices,
    page_csrf,
    portal_process,
    running_portal,
    sign_in,
    store_key,
    write_config,
)
from tests.procs import read_rows
from tests.registry_support import (
    ADMIN,
    ADMIN_PW,
    RESIDENT_ROW,
    admin_session,
    estate_csv,
    import_csv,
    plate_code,
    resident_row,
    stored_plate_code,
    without_tokens,
)

ZHANG, LI, WANG = "13812345678", "13987654321", "13700001111"  # 3-2-301 owner and family, 3-2-302 tenant
ZHAO = "+8613600002222"  # owner of 3-1-101
STRANGER = "13566660000"  # nobody's number yet
MALLORY_PW = "mallory-chose-this-1"
ZHANG_PW = "zhangwei-own-pass-1"
OTC_RE = re.compile(r"一次性登录码：([A-Z0-9]{5}-[A-Z0-9]{5})")
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}


# ---------------------------------------------------------------- a portal process with an estate and its office


@dataclass
class Office:
    """The property office's browser at a portal process."""

    d: Device
    db: Path
    csrf: str = ""

    async def sign_in(self) -> None:
        r = await self.d.sign_in(ADMIN, ADMIN_PW)
        assert r.status == 303, r.status
        self.csrf = await self.d.csrf("/admin/registry")

    async def act(self, resident_id: int, action: str) -> ClientResponse:
        r = await self.d.post(f"/admin/registry/residents/{resident_id}/{action}", {"confirmed": "yes"}, csrf=self.csrf)
        return r

    async def code(self, resident_id: int) -> str:
        r = await self.act(resident_id, "code")
        m = OTC_RE.search(await r.text())
        assert r.status == 200 and m, r.status
        return m.group(1)

    async def import_csv(self, text: str) -> dict[str, Any]:
        r = await self.d.http.post(
            "/api/registry/import",
            data=text.encode(),
            headers={**self.d.headers(), "X-CSRF-Token": self.csrf, "Content-Type": "text/csv"},
        )
        body: dict[str, Any] = await r.json()
        assert r.status == 200 and body["imported"], body
        return body

    async def revocations(self) -> RevocationList:
        """The site's current signed list, verified with the portal's public key."""
        r = await self.d.get("/api/registry/revocations?site=s1")
        assert r.status == 200, r.status
        ring = keyring([load_public_key(self.db.parent / PUBLIC_KEY_FILE)])
        return parse_revocations((await r.json())["lists"]["s1"]["signed"], ring)  # type: ignore[arg-type]


@dataclass
class Rig:
    pp: PortalProcess
    office: Office
    new: Callable[..., Device]
    db: Path

    def plate(self, building: str, unit: str, house: str) -> str:
        return stored_plate_code(self.db, building, unit, house)

    def residency(self, phone: str, house: str) -> dict[str, Any]:
        """The latest residency of a phone in a house, as a dict."""
        conn = connect(self.db, readonly=True)
        try:
            row = conn.execute(RESIDENT_ROW, (phone, house)).fetchone()
            assert row is not None, (phone, house)
            return dict(row)
        finally:
            conn.close()

    def person(self, phone: str) -> tuple[Any, ...]:
        return read_rows(
            self.db, "SELECT name, password_hash, password_request FROM reg_people WHERE phone = ?", phone
        )[0]


def _cli(config: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "portal", *args, "--config", str(config)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )


@contextlib.asynccontextmanager
async def estate_process(tmp_path: Path, extra: str = "") -> AsyncIterator[Rig]:
    """A portal process with estate_csv() imported and the office signed in (from 127.0.9.9)."""
    config = write_config(tmp_path, None, extra=extra)
    pw = tmp_path / "office.password"
    pw.write_text(ADMIN_PW)
    pw.chmod(0o600)
    _cli(config, "adduser", "--user", ADMIN, "--role", "admin", "--password-file", str(pw))
    csv = tmp_path / "estate.csv"
    csv.write_text(estate_csv(), encoding="utf-8")
    _cli(config, "import-estate", str(csv))
    db = tmp_path / "data" / "portal.db"
    with portal_process(config) as pp:
        async with devices(pp.url.rstrip("/")) as new:
            office = Office(new("127.0.9.9"), db)
            await office.sign_in()
            yield Rig(pp, office, new, db)


async def register(
    d: Device,
    plate: str,
    phone: str,
    password: str,
    *,
    name: str = "登记人",
    role: str = "family",
    confirm: str | None = None,
) -> ClientResponse:
    """ "I live here" on a plate, as a stranger fills the form."""
    csrf = await d.csrf(f"/p/{plate}/register")
    return await d.post(
        f"/p/{plate}/register",
        {
            "name": name,
            "phone": phone,
            "role": role,
            "lease_end": "",
            "password": password,
            "confirm": password if confirm is None else confirm,
        },
        csrf=csrf,
    )


async def own_password(rig: Rig, phone: str, house: str, password: str, addr: str) -> Device:
    """The office hands the resident a one-time code; they sign in with it (from ``addr``) and choose a password."""
    code = await rig.office.code(rig.residency(phone, house)["id"])
    d = rig.new(addr)
    r = await d.resident_sign_in(phone, code)
    assert r.status == 303 and r.headers["Location"].startswith("/m/password"), r.status
    r = await d.post("/m/password", {"new": password, "confirm": password, "next": "/m"})
    assert r.status == 303, (r.status, await r.text())
    return d


# ---------------------------------------------------------------- 1. account takeover through "I live here"


async def test_i_live_here_never_takes_over_an_imported_resident(tmp_path: Path) -> None:
    async with estate_process(tmp_path) as rig:
        assert rig.person(ZHANG) == ("张伟", None, None)  # imported by CSV: no password yet
        mallory = rig.new("127.0.21.1")
        # Another house's plate and the victim's own: both taken, neither touches the account.
        for plate in (rig.plate("3", "1", "102"), rig.plate("3", "2", "301")):
            r = await register(mallory, plate, ZHANG, MALLORY_PW, name="Mallory", role="owner")
            assert r.status == 200 and "等待业主或物业确认" in await r.text()
        assert rig.person(ZHANG) == ("张伟", None, None)
        r = await mallory.resident_sign_in(ZHANG, MALLORY_PW)
        assert r.status == 401 and mallory.cookie("gh_resident") is None

        # The office clicks the first button that looks right: the number is linked to 102, still no password.
        req = rig.residency(ZHANG, "102")
        assert req["status"] == "pending" and req["request_name"] == "Mallory"
        page = await (await rig.office.d.get("/admin/registry/pending")).text()
        assert "Mallory" in page and "档案姓名：张伟" in page  # the office sees who the number really belongs to
        assert (await rig.office.act(req["id"], "approve")).status == 303
        assert rig.residency(ZHANG, "102")["status"] == "active"
        assert rig.person(ZHANG)[1] is None
        assert (await mallory.resident_sign_in(ZHANG, MALLORY_PW)).status == 401

        # The real 张伟 gets the office's code and chooses a password; Mallory tries again, with a new password.
        zhang = await own_password(rig, ZHANG, "301", ZHANG_PW, "127.0.21.2")
        assert await zhang.resident_signed_in()
        r = await register(mallory, rig.plate("5", "1", "1201"), ZHANG, MALLORY_PW + "-2", name="Mallory")
        assert r.status == 200
        assert (await mallory.resident_sign_in(ZHANG, MALLORY_PW + "-2")).status == 401
        assert (await rig.new("127.0.21.3").resident_sign_in(ZHANG, ZHANG_PW)).status == 303
        assert await zhang.resident_signed_in()  # and his session was not ended by any of it


async def test_a_known_number_gets_the_same_answer_as_a_new_one(tmp_path: Path) -> None:
    async with estate_process(tmp_path) as rig:
        await own_password(rig, LI, "301", "lina-own-password", "127.0.22.1")
        plate = rig.plate("3", "1", "102")
        n = iter(range(2, 250))

        async def answer(phone: str, password: str = "any-password-12", **kw: str) -> tuple[int, dict[str, str], str]:
            d = rig.new(f"127.0.22.{next(n)}")  # a browser of its own: its own address and CSRF token
            r = await register(d, plate, phone, password, **kw)
            headers = {k: v for k, v in r.headers.items() if k not in ("Date", "Set-Cookie")}
            body = without_tokens(await r.text()).replace(f'value="{phone}"', 'value="PHONE"')  # the echoed number
            return r.status, headers, body

        new = await answer(STRANGER)
        assert new[0] == 200
        for phone in (ZHANG, LI, STRANGER):  # imported without a password; with one; the new one's repeat
            assert await answer(phone) == new, phone
        short = await answer("13566660001", "eleven-char")
        assert short[0] == 400 and "至少需要 12" in short[2]
        assert await answer(LI, "eleven-char") == short
        mismatch = await answer("13566660002", confirm="something-else-1")
        assert await answer(ZHANG, confirm="something-else-1") == mismatch

        # The same cost: a new number and a known one, alternately, each from its own browser.
        times: dict[str, list[float]] = {"new": [], "known": []}
        for i in range(7):
            for kind, phone in (("new", f"1356667{i:04d}"), ("known", (ZHANG, LI, WANG)[i % 3])):
                d = rig.new(f"127.0.23.{i * 2 + (kind == 'known') + 1}")
                csrf = await d.csrf(f"/p/{plate}/register")
                t0 = time.perf_counter()
                r = await d.post(
                    f"/p/{plate}/register",
                    {
                        "name": "计时",
                        "phone": phone,
                        "role": "family",
                        "password": "timing-password-1",
                        "confirm": "timing-password-1",
                    },
                    csrf=csrf,
                )
                times[kind].append(time.perf_counter() - t0)
                assert r.status == 200
        ratio = statistics.median(times["known"]) / statistics.median(times["new"])
        assert 0.5 < ratio < 2.0, times

        # Signing in tells no more: a pending registrant with the password they chose, a known number with a
        # wrong one and a number nobody has get one page.
        def signin_page(body: str, phone: str) -> str:
            return without_tokens(body).replace(f'value="{phone}"', 'value=""')

        got = []
        for phone, password in ((STRANGER, "any-password-12"), (LI, "not-her-password"), ("13566669999", "x" * 12)):
            d = rig.new(f"127.0.24.{len(got) + 1}")
            r = await d.resident_sign_in(phone, password)
            got.append((r.status, signin_page(await r.text(), phone)))
        assert got[0][0] == 401 and got[0] == got[1] == got[2]


# ---------------------------------------------------------------- 2. one limiter for every check of a secret

LOCKS = (
    "trusted_proxies: ['127.0.0.1']\n"
    "auth: {max_failures_user_address: 3, max_failures_address: 5, max_failures_user: 6}\n"
)


async def test_one_limiter_for_every_check_of_a_residents_secret(tmp_path: Path) -> None:
    async with estate_process(tmp_path, LOCKS) as rig:
        home = await own_password(rig, ZHANG, "301", ZHANG_PW, "127.0.30.1")
        # The register page checks no secret, so it cannot be used to guess one (nor to lock anyone out).
        plate102 = rig.plate("3", "1", "102")
        for i in range(8):
            r = await register(rig.new(f"127.0.30.{10 + i}"), plate102, ZHANG, f"guess-number-{i:03d}")
            assert r.status == 200
        assert (await rig.new("127.0.30.30").resident_sign_in(ZHANG, ZHANG_PW)).status == 303

        # A wrong current password at a change and a wrong sign-in, from one address: one count, one lock.
        for guess in ("guess-current-1", "guess-current-2"):
            r = await home.post(
                "/m/password", {"current": guess, "new": "new-password-123", "confirm": "new-password-123"}
            )
            assert r.status == 401 and "当前密码不正确" in await r.text()
        assert (await rig.new("127.0.30.1").resident_sign_in(ZHANG, "guess-signin-1")).status == 401
        r = await rig.new("127.0.30.1").resident_sign_in(ZHANG, ZHANG_PW)
        assert r.status == 429 and int(r.headers["Retry-After"]) > 0
        r = await home.post(
            "/m/password", {"current": ZHANG_PW, "new": "new-password-123", "confirm": "new-password-123"}
        )
        assert r.status == 429  # the right current password too, while the lock holds
        assert (await rig.new("127.0.30.2").resident_sign_in(ZHANG, ZHANG_PW)).status == 303  # elsewhere: fine

        # IPv6 counts by /64: a sprayer moving through one network is one address.
        for i in range(5):
            r = await rig.new(f"2001:db8:7:1::{i + 1:x}").resident_sign_in(f"1356661{i:04d}", "spray-password-1")
            assert r.status == 401
        assert (await rig.new("2001:db8:7:1::beef").resident_sign_in(ZHANG, ZHANG_PW)).status == 429
        assert (await rig.new("2001:db8:7:2::1").resident_sign_in(ZHANG, ZHANG_PW)).status == 303

        # One number guessed from many places locks it, except where its resident has signed in before.
        await own_password(rig, LI, "301", "lina-own-password", "127.0.31.1")
        for i in range(6):
            assert (await rig.new(f"127.0.32.{i + 1}").resident_sign_in(LI, f"guess-li-{i:05d}")).status == 401
        assert (await rig.new("127.0.32.99").resident_sign_in(LI, "lina-own-password")).status == 429
        assert (await rig.new("127.0.31.1").resident_sign_in(LI, "lina-own-password")).status == 303
        rows = read_rows(
            rig.db,
            "SELECT action, target, detail FROM audit WHERE action LIKE 'signin.%' OR action LIKE 'password.current.%'",
        )
        assert ("password.current.failed", "phone:138****5678", "wrong secret") in rows
        assert any(a == "signin.lock" and t == "phone:139****4321" for a, t, _ in rows)
        assert not any(ZHANG in str(r) or ZHANG_PW in str(r) for r in rows)


# ---------------------------------------------------------------- account pre-hijacking


async def test_a_password_chosen_in_a_request_reaches_no_house_someone_else_links(tmp_path: Path) -> None:
    async with estate_process(tmp_path) as rig:
        # A number nobody has yet: Mallory asks for it (pending, never approved); the office then imports its real
        # owner into 302. Mallory's password is gone with the link.
        mallory = rig.new("127.0.40.1")
        assert (await register(mallory, rig.plate("3", "1", "102"), STRANGER, MALLORY_PW)).status == 200
        assert rig.person(STRANGER)[1] is not None
        await rig.office.import_csv(
            f"site,building,unit,house,name,phone,role,move_in\ns1,3,2,302,孙新,{STRANGER},family,2024-01-01\n"
        )
        assert rig.person(STRANGER)[1] is None
        assert (await mallory.resident_sign_in(STRANGER, MALLORY_PW)).status == 401
        audit = read_rows(rig.db, "SELECT action FROM audit WHERE action = 'resident.password_withdrawn'")
        assert audit == [("resident.password_withdrawn",)]

        # Zhao, owner of 101, asks for another fresh number in his own flat and approves it himself: that number
        # opens his flat with his password. When its real owner asks to live in 302 and the office approves, the
        # password Zhao chose stops working and his session on that number ends.
        zhao = await own_password(rig, ZHAO, "101", "zhao-own-password", "127.0.40.2")
        other = "13566661111"
        plate101 = rig.plate("3", "1", "101")
        assert (await register(rig.new("127.0.40.3"), plate101, other, MALLORY_PW)).status == 200
        req = rig.residency(other, "101")
        r = await zhao.post(f"/p/{plate101}/confirm", {"resident": str(req["id"]), "action": "approve"})
        assert r.status == 303
        hijacker = rig.new("127.0.40.4")
        assert (await hijacker.resident_sign_in(other, MALLORY_PW)).status == 303
        assert await hijacker.resident_signed_in()
        assert (
            await register(rig.new("127.0.40.5"), rig.plate("3", "2", "302"), other, "real-owner-pass-1", name="钱真")
        ).status == 200
        assert (await rig.office.act(rig.residency(other, "302")["id"], "approve")).status == 303
        assert not await hijacker.resident_signed_in()
        assert (await rig.new("127.0.40.6").resident_sign_in(other, MALLORY_PW)).status == 401
        assert (await rig.new("127.0.40.7").resident_sign_in(other, "real-owner-pass-1")).status == 401

        # A resident whose password a request chose, asking for another home while signed in, keeps it: the
        # request came from the account itself.
        newcomer = "13566662222"
        assert (
            await register(rig.new("127.0.40.8"), rig.plate("3", "1", "102"), newcomer, "newcomer-pass-1", name="周新")
        ).status == 200
        assert (await rig.office.act(rig.residency(newcomer, "102")["id"], "approve")).status == 303
        me = rig.new("127.0.40.8")
        assert (await me.resident_sign_in(newcomer, "newcomer-pass-1")).status == 303
        plate = rig.plate("5", "1", "1201")
        page = await (await me.get(f"/p/{plate}/register")).text()
        assert 'id="register-as"' in page and "135****2222" in page and 'name="phone"' not in page
        r = await me.post(f"/p/{plate}/register", {"for": "me", "role": "owner", "lease_end": ""})
        assert r.status == 200
        assert rig.residency(newcomer, "1201")["source"] == "account"
        assert (await rig.office.act(rig.residency(newcomer, "1201")["id"], "approve")).status == 303
        assert (await rig.new("127.0.40.9").resident_sign_in(newcomer, "newcomer-pass-1")).status == 303
        assert await me.resident_signed_in()


async def test_two_strangers_claiming_one_new_number_at_one_flat_neither_keeps_a_password(tmp_path: Path) -> None:
    """Nobody checks a phone number. Mallory, who knows a newcomer's number, asks first to live in 102 with it and
    her password; the newcomer asks after her, with theirs, and gets the same answer. The owner approves the one
    request they see. Neither password may open the flat: the second request withdrew the first one's (whoever
    came first must not win the account), and the person signs in with the office's one-time code."""
    async with estate_process(tmp_path) as rig:
        plate = rig.plate("3", "1", "102")
        newcomer = "13566663333"
        assert (await register(rig.new("127.0.41.1"), plate, newcomer, MALLORY_PW, name="吴新")).status == 200
        assert rig.person(newcomer)[1] is not None  # her password, waiting for the approval
        assert (await register(rig.new("127.0.41.2"), plate, newcomer, "newcomer-pass-1", name="吴新")).status == 200
        assert rig.person(newcomer)[1] is None
        audit = read_rows(rig.db, "SELECT action FROM audit WHERE action LIKE 'register.%' ORDER BY id")
        assert audit == [("register.request",), ("register.repeat",), ("register.contested",)]
        assert (await rig.office.act(rig.residency(newcomer, "102")["id"], "approve")).status == 303
        for addr, password in (("127.0.41.3", MALLORY_PW), ("127.0.41.4", "newcomer-pass-1")):
            assert (await rig.new(addr).resident_sign_in(newcomer, password)).status == 401, password
        await own_password(rig, newcomer, "102", "newcomer-own-pass", "127.0.41.5")  # the office's code works
        # A request made after approval changes nothing.
        assert (await register(rig.new("127.0.41.6"), plate, newcomer, MALLORY_PW)).status == 200
        assert (await rig.new("127.0.41.7").resident_sign_in(newcomer, "newcomer-own-pass")).status == 303
        # One person asking twice with their password (a second try) keeps it: that is no second claimant.
        again = "13566664444"
        for addr in ("127.0.41.8", "127.0.41.9"):
            assert (await register(rig.new(addr), plate, again, "asked-twice-pass")).status == 200
        assert (await rig.office.act(rig.residency(again, "102")["id"], "approve")).status == 303
        assert (await rig.new("127.0.41.10").resident_sign_in(again, "asked-twice-pass")).status == 303


async def test_a_flat_s_household_shows_the_name_its_request_typed_not_the_office_s(tmp_path: Path) -> None:
    """An owner can ask for any number in their own flat and approve it: the household list must not then show
    the name the office has on file for that number (a name for any phone number), only the one typed."""
    async with estate_process(tmp_path) as rig:
        zhao = await own_password(rig, ZHAO, "101", "zhao-own-password", "127.0.42.1")
        plate101 = rig.plate("3", "1", "101")
        assert (await register(rig.new("127.0.42.2"), plate101, LI, MALLORY_PW, name="猜猜")).status == 200
        req = rig.residency(LI, "101")
        r = await zhao.post(f"/p/{plate101}/confirm", {"resident": str(req["id"]), "action": "approve"})
        assert r.status == 303
        page = await (await zhao.get(f"/p/{plate101}")).text()
        assert "猜猜" in page and "李娜" not in page  # 李娜: her name on file (tests.registry_support.PEOPLE)


# ---------------------------------------------------------------- 4. revocation holds when a resident comes back


async def test_a_moved_out_resident_who_registers_again_stays_revoked(tmp_path: Path) -> None:
    async with estate_process(tmp_path) as rig:
        plate = rig.plate("3", "2", "301")
        zhang = await own_password(rig, ZHANG, "301", ZHANG_PW, "127.0.50.1")
        r = await zhang.post(f"/p/{plate}/visitor", {"hours": "8", "uses": "2"})
        assert r.status == 303
        pass_id = bytes.fromhex(read_rows(rig.db, "SELECT pass_id FROM visitor_passes")[0][0])
        first = rig.residency(ZHANG, "301")
        assert (await rig.office.act(first["id"], "moveout")).status == 303
        rl = await rig.office.revocations()
        assert first["subject"] in rl.subjects and pass_id in rl.passes

        # He asks to live there again (signed out: a moved-out resident cannot sign in), and the office rejects it.
        assert (await rig.new("127.0.50.2").resident_sign_in(ZHANG, ZHANG_PW)).status == 401
        assert (await register(rig.new("127.0.50.3"), plate, ZHANG, "whatever-typed-1", role="owner")).status == 200
        again = rig.residency(ZHANG, "301")
        assert again["id"] != first["id"] and again["status"] == "pending" and again["subject"] != first["subject"]
        rl = await rig.office.revocations()
        assert first["subject"] in rl.subjects and pass_id in rl.passes
        assert (await rig.office.act(again["id"], "reject")).status == 303
        rl = await rig.office.revocations()
        assert first["subject"] in rl.subjects and pass_id in rl.passes and again["subject"] not in rl.subjects

        # Again, approved this time: back home under a new subject; the old one and its pass stay revoked.
        assert (await register(rig.new("127.0.50.4"), plate, ZHANG, "whatever-typed-2", role="owner")).status == 200
        third = rig.residency(ZHANG, "301")
        assert (await rig.office.act(third["id"], "approve")).status == 303
        assert rig.residency(ZHANG, "301")["status"] == "active"
        assert len({first["subject"], again["subject"], third["subject"]}) == 3
        rl = await rig.office.revocations()
        assert first["subject"] in rl.subjects and pass_id in rl.passes and third["subject"] not in rl.subjects
        back = rig.new("127.0.50.5")
        assert (await back.resident_sign_in(ZHANG, ZHANG_PW)).status == 303  # his own password, his own house
        r = await back.get(f"/p/{plate}/mypass.json")
        assert r.status == 200

        # The office's other ways back give new subjects too: deactivate and reactivate, or an import.
        assert (await rig.office.act(third["id"], "deactivate")).status == 303
        assert (await rig.office.act(third["id"], "reactivate")).status == 303
        fourth = rig.residency(ZHANG, "301")
        assert fourth["id"] != third["id"] and fourth["subject"] not in (first["subject"], third["subject"])
        assert (await rig.office.act(fourth["id"], "moveout")).status == 303
        await rig.office.import_csv(
            f"site,building,unit,house,name,phone,role,move_in\ns1,3,2,301,张伟,{ZHANG},owner,2020-05-01\n"
        )
        fifth = rig.residency(ZHANG, "301")
        assert fifth["id"] != fourth["id"] and fifth["status"] == "active"
        rl = await rig.office.revocations()
        for gone in (first, third, fourth):
            assert gone["subject"] in rl.subjects
        assert pass_id in rl.passes and fifth["subject"] not in rl.subjects


def test_a_store_from_before_gets_its_revived_subjects_back_on_the_list(tmp_path: Path) -> None:
    """The old code put a moved-out person's row back to pending under its revoked subject; the migration makes
    that stay an ended row of its own again, with its visitor passes, and gives the request a fresh subject."""
    step = next(s.version for s in steps("sqlite") if s.path.suffix == ".sql" and "reg_residents_new" in s.sql()) - 1
    db = tmp_path / "portal.db"
    conn = connect(db, key=store_key(db))  # the store key's own migration follows this one
    try:
        migrate(conn, upto=step)
        rows, errors = reg.parse_import(estate_csv().encode())
        assert not errors
        conn.execute("BEGIN IMMEDIATE")
        reg_apply_old_import(conn, rows)
        rid, subject = conn.execute(
            "SELECT r.id, r.subject FROM reg_residents r JOIN reg_people p ON p.id = r.person_id WHERE p.phone = ?",
            (ZHANG,),
        ).fetchone()
        conn.execute(
            "INSERT INTO visitor_passes (token_hash, resident_id, pass_id, subject, pass_text, not_before,"
            " not_after, uses, created_at) VALUES ('t', ?, ?, 'v:x', 'x', 0, ?, 1, '2026-01-01')",
            (rid, "ab" * 12, int(time.time()) + 3600),
        )
        # what the old register() did to a moved-out resident who registered again
        conn.execute(
            "UPDATE reg_residents SET status = 'pending', move_out = NULL, source = 'register',"
            " created_at = ? WHERE id = ?",
            (reg.now_text(), rid),
        )
        conn.execute("COMMIT")
        assert migrate(conn) == SCHEMA_VERSION
        ended = conn.execute(
            "SELECT id, status, ever_active FROM reg_residents WHERE subject = ?", (subject,)
        ).fetchone()
        assert ended[0] != rid and tuple(ended[1:]) == ("inactive", 1)
        request = conn.execute("SELECT status, subject, ever_active FROM reg_residents WHERE id = ?", (rid,)).fetchone()
        assert request[0] == "pending" and request[1] != subject and request[2] == 0
        assert conn.execute("SELECT resident_id FROM visitor_passes").fetchone()[0] == ended[0]
        site = conn.execute("SELECT id FROM reg_sites").fetchone()[0]
        subjects, passes = reg.revoked_for_site(conn, site, date.today().isoformat(), int(time.time()))
        assert subject in subjects and bytes.fromhex("ab" * 12) in passes
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        conn.close()


def reg_apply_old_import(conn: Any, rows: list[reg.ImportRow]) -> None:
    """estate_csv() written as the schema before residents' accounts had it (no request_name column yet, plate
    codes still kept in clear: the store key came later)."""

    def get(sql: str, ins: str, args: tuple[Any, ...]) -> int:
        row = conn.execute(sql, args).fetchone()
        return int(row[0]) if row else int(conn.execute(ins, args).lastrowid)

    for r in rows:
        sid = reg.ensure_site(conn, r.site, r.site_name)
        bid = get(
            "SELECT id FROM reg_buildings WHERE site_id = ? AND code = ?",
            "INSERT INTO reg_buildings (site_id, code) VALUES (?, ?)",
            (sid, r.building),
        )
        uid = get(
            "SELECT id FROM reg_units WHERE building_id = ? AND code = ?",
            "INSERT INTO reg_units (building_id, code) VALUES (?, ?)",
            (bid, r.unit),
        )
        hid = get(
            "SELECT id FROM reg_houses WHERE unit_id = ? AND code = ?",
            "INSERT INTO reg_houses (unit_id, code) VALUES (?, ?)",
            (uid, r.house),
        )
        for kind, col, ref in (("entrance", "unit_id", uid), ("house", "house_id", hid)):
            if conn.execute(f"SELECT 1 FROM plates WHERE {col} = ?", (ref,)).fetchone() is None:
                code = reg.new_plate_code()
                conn.execute(
                    f"INSERT INTO plates (code_hash, code, kind, {col}, created_at) VALUES (?, ?, ?, ?, ?)",
                    (reg.code_hash(code), code, kind, ref, reg.now_text()),
                )
        if r.phone and r.name and r.role:
            pid = reg.ensure_person(conn, r.phone, r.name)
            conn.execute(
                "INSERT INTO reg_residents (person_id, house_id, subject, role, status, move_in, lease_end,"
                " source, created_at, ever_active) VALUES (?, ?, ?, ?, 'active', ?, ?, 'import', ?, 1)",
                (pid, hid, reg.new_subject(), r.role, r.move_in, r.lease_end, reg.now_text()),
            )


# ---------------------------------------------------------------- 3. ASVS L2 rules that need the clock


async def alive(d: Device) -> bool:
    """Is the device's resident session alive (also one that must set a password first)?"""
    r = await d.get("/m/password")
    assert r.status in (200, 303), r.status
    return r.status == 200


async def test_password_rules_change_and_re_authentication(tmp_path: Path) -> None:
    now = [time.time()]
    async with running_portal(write_config(tmp_path, None), Options(clock=lambda: now[0])) as p, devices(p) as new:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        plate = await plate_code(p, "3", "2", "301")

        async def office_code(phone: str, house: str) -> str:
            """The office's one-time code (signing in again after the clock has jumped past its session)."""
            nonlocal csrf
            if (await p.client.get("/admin/registry", allow_redirects=False)).status != 200:
                assert (await sign_in(p, ADMIN, ADMIN_PW)).status == 303
                csrf = await page_csrf(p, "/admin/registry")
            res = await resident_row(p, phone, house)
            r = await p.client.post(
                f"/admin/registry/residents/{res['id']}/code", data={"csrf": csrf}, headers={"Origin": p.origin}
            )
            m = OTC_RE.search(await r.text())
            assert m
            return m.group(1)

        # A one-time code opens a session that may set a password without a current one, for a few minutes only.
        d = new("127.0.60.1")
        assert (await d.resident_sign_in(ZHANG, await office_code(ZHANG, "301"))).status == 303
        page = await (await d.get("/m/password")).text()
        assert 'id="current-password"' not in page
        now[0] += REAUTH_S + 60
        page = await (await d.get("/m/password")).text()
        assert 'id="current-password"' in page
        r = await d.post("/m/password", {"new": ZHANG_PW, "confirm": ZHANG_PW})
        assert r.status == 400
        # ... a fresh code from the office does as the current secret; 11 characters are too few.
        code = await office_code(ZHANG, "301")
        r = await d.post("/m/password", {"current": code, "new": "eleven-char", "confirm": "eleven-char"})
        assert r.status == 400 and "至少需要 12" in await r.text()
        assert phone_pages._new_password_error(ZHAO, ZHAO, ZHAO)[0] == "register.password_is_phone"  # type: ignore
        code = await office_code(ZHANG, "301")
        other = new("127.0.60.2")
        assert (await other.resident_sign_in(ZHANG, code)).status == 303 and await alive(other)
        code = await office_code(ZHANG, "301")
        r = await d.post("/m/password", {"current": code, "new": ZHANG_PW, "confirm": ZHANG_PW})
        assert r.status == 303
        assert not await alive(other)  # every other session ended
        r = await d.post(
            "/m/password", {"current": "not-the-password", "new": "another-pass-12", "confirm": "another-pass-12"}
        )
        assert r.status == 401

        # Approving a household member needs the secret again once the sign-in is a few minutes old.
        assert (await register(new("127.0.60.3"), plate, STRANGER, "stranger-pass-1", name="新成员")).status == 200
        member = await resident_row(p, STRANGER, "301")
        now[0] += REAUTH_S + 60
        form = {"resident": str(member["id"]), "action": "approve"}
        r = await d.post(f"/p/{plate}/confirm", form)
        text = await r.text()
        assert r.status == 401 and 'id="reauth-secret"' in text and f'value="{member["id"]}"' in text
        r = await d.post(f"/p/{plate}/confirm", {**form, "reauth_secret": "not-the-password"})
        assert r.status == 401 and "密码不正确" in await r.text()
        assert (await resident_row(p, STRANGER, "301"))["status"] == "pending"
        r = await d.post(f"/p/{plate}/confirm", {**form, "reauth_secret": ZHANG_PW})
        assert r.status == 303 and (await resident_row(p, STRANGER, "301"))["status"] == "active"
        # ... and a visitor pass over 24 hours; 24 hours or less does not.
        now[0] += REAUTH_S + 60
        r = await d.post(f"/p/{plate}/visitor", {"hours": "24", "uses": "1"})
        assert r.status == 303
        r = await d.post(f"/p/{plate}/visitor", {"hours": "72", "uses": "1"})
        assert r.status == 401 and 'id="reauth-secret"' in await r.text()
        passes = await p.services.store.read(lambda c: c.execute("SELECT count(*) FROM visitor_passes").fetchone()[0])
        assert passes == 1
        r = await d.post(f"/p/{plate}/visitor", {"hours": "72", "uses": "1", "reauth_secret": ZHANG_PW})
        assert r.status == 303 and r.headers["Location"].startswith("/m/v/")
        # Re-authentication failures count in the one limiter: two more wrong secrets lock the sign-in too.
        now[0] += REAUTH_S + 60
        for guess in ("guess-reauth-001", "guess-reauth-002"):
            r = await d.post(f"/p/{plate}/visitor", {"hours": "72", "uses": "1", "reauth_secret": guess})
            assert r.status == 401
        rows = await p.services.store.read(
            lambda c: [r[0] for r in c.execute("SELECT action FROM audit WHERE action LIKE 'reauth%' ORDER BY id")]
        )
        assert rows.count("reauth.failed") == 3 and rows.count("reauth") == 2
        # (A success clears the number + address count, as for staff: these two and eight wrong sign-ins make
        # the ten that lock it.)
        for i in range(10 - 2):
            assert (await new("127.0.60.1").resident_sign_in(ZHANG, f"guess-login-{i:03d}")).status == 401
        assert (await new("127.0.60.1").resident_sign_in(ZHANG, ZHANG_PW)).status == 429

        # Sessions last at most 30 days, however busy; the cookie says so too.
        d2 = new("127.0.60.9")
        r = await d2.resident_sign_in(LI, await office_code(LI, "301"))
        assert r.status == 303
        assert int(r.cookies["gh_resident"]["max-age"]) <= 30 * 86400 == RESIDENT_ABSOLUTE_S
        for _ in range(2):  # used every ten days: never idle ...
            now[0] += 10 * 86400
            assert await alive(d2)
            await p.services.store.flush()  # (the session's last-seen time is written behind the request)
        now[0] += 10 * 86400 + 1  # ... but 30 days after the sign-in, over
        assert not await alive(d2)


async def test_a_password_shorter_than_twelve_must_be_changed_at_the_next_sign_in(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p, devices(p) as new:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        h = await p.services.auth.hash_password("old-8char")  # what the old rule (8) allowed
        await p.services.store.run_write(
            lambda c: c.execute("UPDATE reg_people SET password_hash = ? WHERE phone = ?", (h, ZHANG))
        )
        d = new("127.0.61.1")
        r = await d.resident_sign_in(ZHANG, "old-8char")
        assert r.status == 303 and r.headers["Location"].startswith("/m/password")
        assert (await d.get("/m")).headers["Location"] == "/m/password"
        page = await (await d.get("/m/password")).text()
        assert 'id="password-too-short"' in page and 'id="current-password"' in page
        r = await d.post("/m/password", {"current": "old-8char", "new": ZHANG_PW, "confirm": ZHANG_PW})
        assert r.status == 303 and await d.resident_signed_in()


async def test_hsts_whenever_cookies_are_secure(tmp_path: Path) -> None:
    for secure in (True, False):
        folder = tmp_path / str(secure)
        async with running_portal(write_config(folder, None, extra=f"cookie_secure: {str(secure).lower()}\n")) as p:
            for path in ("/m/login", "/login", "/api/health", "/no-such-page"):
                r = await p.client.get(path, allow_redirects=False)
                hsts = r.headers.get("Strict-Transport-Security")
                assert (hsts == "max-age=31536000") if secure else hsts is None, (path, hsts)


# ---------------------------------------------------------------- the changed phone pages in a browser


async def test_register_reauth_and_password_change_at_phone_size(tmp_path: Path, artifacts: Path) -> None:
    now = [time.time()]
    async with (
        running_portal(write_config(tmp_path, None), Options(clock=lambda: now[0])) as p,
        async_playwright() as pw,
    ):
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        plate = await plate_code(p, "3", "2", "301")
        owner = await resident_row(p, ZHANG, "301")
        r = await p.client.post(
            f"/admin/registry/residents/{owner['id']}/code", data={"csrf": csrf}, headers={"Origin": p.origin}
        )
        m = OTC_RE.search(await r.text())
        assert m
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            ph = await (await browser.new_context(**PHONE)).new_page()  # type: ignore[arg-type]
            # A stranger's form says what happens to a number that is known already.
            await ph.goto(f"{p.origin}/p/{plate}/register")
            await expect(ph.locator("#register-known")).to_contain_text("原密码保持不变")
            await ph.fill("#reg-name", "新成员")
            await ph.fill("#reg-phone", STRANGER)
            await ph.fill("#reg-password", "short-pw")
            await ph.fill("#reg-confirm", "short-pw")
            await ph.evaluate("document.querySelector('#reg-password').removeAttribute('minlength')")
            await ph.click("#reg-submit")
            await expect(ph.locator("#error")).to_contain_text("至少需要 12")
            await ph.fill("#reg-password", "stranger-pass-1")
            await ph.fill("#reg-confirm", "stranger-pass-1")
            await ph.click("#reg-submit")
            await expect(ph.locator("#message")).to_contain_text("原来的密码不变")
            await ph.screenshot(path=str(artifacts / "phone_register_sent.png"), full_page=True)

            # The owner signs in with the office's code and sets a password at once (no current one asked).
            await ph.goto(f"{p.origin}/m/login?next=/p/{plate}")
            await ph.fill("#login-phone", ZHANG)
            await ph.fill("#login-password", m.group(1))
            await ph.click("#login-submit")
            await ph.wait_for_url("**/m/password**")
            assert await ph.locator("#current-password").count() == 0
            await ph.fill("#new-password", ZHANG_PW)
            await ph.fill("#confirm-password", ZHANG_PW)
            await ph.click("#password-submit")
            await ph.wait_for_url(f"**/p/{plate}")

            # Twenty minutes later, confirming the new member asks for the password again, then does it.
            now[0] += REAUTH_S + 300
            member = await resident_row(p, STRANGER, "301")
            await ph.reload()
            await expect(ph.locator(f'#to-confirm li[data-resident="{member["id"]}"] .name')).to_have_text("新成员")
            await ph.click(f"#confirm-{member['id']}")
            await expect(ph.locator("#reauth-reason")).to_contain_text("同意他人成为本户住户")
            await ph.screenshot(path=str(artifacts / "phone_reauth.png"), full_page=True)
            await ph.fill("#reauth-secret", "not-my-password")
            await ph.click("#reauth-submit")
            await expect(ph.locator("#error")).to_be_visible()
            await ph.fill("#reauth-secret", ZHANG_PW)
            await ph.click("#reauth-submit")
            await ph.wait_for_url(f"**/p/{plate}")
            await expect(ph.locator("#household")).to_contain_text("新成员")

            # A 72-hour visitor pass right after: the secret was just given, no second prompt.
            await ph.select_option("#visitor-hours", "72")
            await ph.click("#visitor-issue")
            await ph.wait_for_url("**/m/v/**")

            # Changing the password later needs the current one, in English too.
            now[0] += REAUTH_S + 300
            await ph.goto(f"{p.origin}/lang/en?next=/m/password")
            await expect(ph.locator("#current-password")).to_be_visible()
            await ph.fill("#current-password", ZHANG_PW)
            await ph.fill("#new-password", "zhangwei-newer-1")
            await ph.fill("#confirm-password", "zhangwei-newer-1")
            await ph.click("#password-submit")
            await ph.wait_for_url("**/m")
            await expect(ph.locator("#homes")).to_contain_text("Living here")
        finally:
            await browser.close()
