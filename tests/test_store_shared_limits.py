"""Two portal instances on one PostgreSQL: sessions, CSRF tokens, rate limits and sign-in locks hold whichever
instance a request reaches (an attacker who spreads guesses over the instances behind a balancer gains nothing);
one instance on SQLite keeps its limits in memory, as before."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from yarl import URL

from portal.store import Postgres, Store
from portal.web.auth import MemoryLocks, SharedLocks
from portal.web.ratelimit import MemoryLimiter, SharedLimiter
from tests.portal_support import devices, running_portal, store_key, write_config

WRONG = "not-the-password"


async def test_a_rate_limit_is_one_bucket_for_every_instance(pg_target: Postgres) -> None:
    now = [1_000_000.0]
    stores = [Store(pg_target, key=store_key(pg_target)) for _ in range(2)]
    for s in stores:
        await s.start()
    try:
        a, b = (SharedLimiter(s, "sos", 3, 300, clock=lambda: now[0]) for s in stores)
        # six presses at once, spread over both instances: three go through, whichever instance took them
        results = await asyncio.gather(*(lim.allow("h7") for lim in (a, b, a, b, a, b)))
        assert sorted(results) == [False, False, False, True, True, True]
        assert await a.blocked("h7") and await b.blocked("h7")
        assert await a.allow("h8")  # another house has a bucket of its own
        now[0] += 100  # one token back (3 per 300 s)
        assert await b.allow("h7") and not await a.allow("h7")
        await a.spend("h9", 10)  # failures count even past empty, on every instance
        assert await b.blocked("h9")
    finally:
        for s in stores:
            await s.close()


def _config(folder: Path, target: Postgres, key_file: Path | None) -> Path:
    extra = (
        f"store: {{backend: postgresql, dsn: '{target.dsn}', passfile: {target.passfile}"
        + (f", key_file: {key_file}" if key_file else "")
        + "}\n"
        "auth: {max_failures_user_address: 3, max_failures_address: 20, max_failures_user: 30,"
        " argon2_memory_kib: 8192, argon2_time_cost: 5}\n"
    )
    return write_config(folder, None, extra=extra)


async def test_sessions_csrf_and_sign_in_locks_hold_across_two_instances(tmp_path: Path, pg_target: Postgres) -> None:
    async with running_portal(_config(tmp_path / "a", pg_target, None), last=False) as pa:
        password = pa.admin_password
        key = tmp_path / "b" / "store.key"  # every instance holds the same store key
        key.parent.mkdir(parents=True)
        shutil.copy(Path(pa.services.cfg.key_path), key)
        key.chmod(0o600)
        async with (
            running_portal(_config(tmp_path / "b", pg_target, key)) as pb,
            devices(pa) as on_a,
            devices(pb) as on_b,
        ):
            assert isinstance(pa.services.auth.locks, SharedLocks)
            # guesses for one name from one address, alternating between the instances: locked after three
            guess_a, guess_b = on_a("127.0.1.1"), on_b("127.0.1.1")
            assert (await guess_a.sign_in("admin", WRONG + "1")).status == 401
            assert (await guess_b.sign_in("admin", WRONG + "2")).status == 401
            assert (await guess_a.sign_in("admin", WRONG + "3")).status == 401
            for d in (guess_b, guess_a):  # now even the right password waits, on both
                r = await d.sign_in("admin", password)
                assert r.status == 429 and int(r.headers["Retry-After"]) > 800
            # the office, from its own address, signs in at A; its session and CSRF token work at B
            office_a, office_b = on_a("127.0.2.1"), on_b("127.0.2.1")
            assert (await office_a.sign_in("admin", password)).status == 303
            cookie = office_a.cookie("gh_session")
            assert cookie
            office_b.http.cookie_jar.update_cookies({"gh_session": cookie}, URL(office_b.origin))
            r = await office_b.get("/password")
            assert r.status == 200, r.status  # the first admin must change the one-time password: same at B
            csrf = await office_a.csrf("/password")
            new = "a-much-better-passphrase"
            r = await office_b.post("/password", {"current": password, "new": new, "confirm": new}, csrf=csrf)
            assert r.status == 303, await r.text()
            # the change ended every session, so A does not know the old cookie either
            assert (await office_a.get("/console")).status in (302, 303)


async def test_one_instance_on_sqlite_keeps_its_limits_in_memory(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        assert not p.services.store.shared
        assert isinstance(p.services.auth.locks, MemoryLocks)
        from portal.estate.service import ESTATE

        assert all(isinstance(lim, MemoryLimiter) for lim in p.client.server.app[ESTATE].limits.values())
