"""Rate limits: token buckets on an injected clock; the client they key on is the direct peer unless that
peer is a trusted reverse proxy, and then the right-most address in X-Forwarded-For that is not a trusted
proxy (a spoofed header from anyone else is ignored); and an unknown plate code costs the same time as a
withdrawn one, so timing tells a guesser nothing."""

from __future__ import annotations

import ipaddress
import random
import statistics
import time
from pathlib import Path

import pytest

from portal.config import ConfigError, parse
from portal.estate import registry as reg
from portal.web.ratelimit import RateLimiter, client_address, networks
from tests.portal_support import running_portal, write_config
from tests.registry_support import admin_session, estate_csv, form, house_id, import_csv, plate_code

TRUSTED = networks(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_refills_with_time_and_failures_count_even_when_empty() -> None:
    clock = Clock()
    rl = RateLimiter(3, 60, clock=clock)  # 3 a minute: one token every 20 s
    assert [rl.allow("a") for _ in range(4)] == [True, True, True, False]
    assert rl.blocked("a") and not rl.blocked("b") and rl.allow("b")
    clock.now += 19.9
    assert not rl.allow("a")
    clock.now += 0.2
    assert rl.allow("a") and not rl.allow("a")
    rl.spend("a", 2)  # already empty: now in debt, so it takes longer to come back
    clock.now += 40
    assert rl.blocked("a")
    clock.now += 20.1
    assert not rl.blocked("a")
    clock.now += 3600
    assert [rl.allow("a") for _ in range(4)] == [True, True, True, False]  # never more than the capacity


def test_buckets_are_bounded_and_the_oldest_key_is_forgotten_first() -> None:
    rl = RateLimiter(1, 60, max_keys=3, clock=Clock())
    for key in ("a", "b", "c"):
        assert rl.allow(key)
    assert not rl.allow("a")  # "a" is now the most recently used
    assert rl.allow("d")  # evicts "b"
    assert rl.allow("b") and not rl.allow("a")
    with pytest.raises(ValueError):
        RateLimiter(0, 60)


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("203.0.113.9", ["6.6.6.6"], "203.0.113.9"),  # an untrusted peer's header is ignored
        ("10.0.0.0", ["6.6.6.6"], "6.6.6.6"),
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
        ("127.0.0.1", ["6.6.6.6, 203.0.113.7"], "203.0.113.7"),  # what the client wrote stands left of its address
        ("127.0.0.1", ["6.6.6.6", "203.0.113.7"], "203.0.113.7"),  # several headers make one list
        ("127.0.0.1", ["6.6.6.6, 203.0.113.7, 10.1.2.3"], "203.0.113.7"),  # through two trusted proxies
        ("127.0.0.1", ["10.1.2.3"], "10.1.2.3"),  # only proxies on the way: the farthest one
        ("127.0.0.1", ["203.0.113.7, not-an-address"], "127.0.0.1"),  # unreadable: stop at the last proxy believed
        ("127.0.0.1", ["not-an-address, 203.0.113.7"], "203.0.113.7"),
        ("127.0.0.1", ["", " 203.0.113.7:51234 "], "203.0.113.7"),
        ("127.0.0.1", ["[2001:db8::7]:443"], "2001:db8::7"),
        ("127.0.0.1", ["2001:DB8:0:0::7"], "2001:db8::7"),  # one spelling, one bucket
        ("::ffff:127.0.0.1", ["203.0.113.7"], "203.0.113.7"),  # a dual-stack listener's view of an IPv4 proxy
        ("fd00::1", ["203.0.113.7"], "203.0.113.7"),
        ("fe80::1", ["203.0.113.7"], "fe80::1"),
        (None, ["203.0.113.7"], None),
        ("", ["203.0.113.7"], ""),
    ],
)
def test_the_client_is_the_right_most_address_no_trusted_proxy_added(
    peer: str | None, forwarded_for: list[str], client: str | None
) -> None:
    assert client_address(peer, forwarded_for, TRUSTED) == client
    assert client_address(peer, forwarded_for, ()) == peer  # no proxies configured: the header is never read


def test_trusted_proxies_must_be_networks(tmp_path: Path) -> None:
    ok = parse(tmp_path / "portal.yaml", "trusted_proxies: [127.0.0.1, 10.0.0.0/8, 'fd00::/8']\n")
    assert networks(ok.trusted_proxies) == TRUSTED
    with pytest.raises(ConfigError) as e:
        parse(tmp_path / "portal.yaml", "site_name: x\ntrusted_proxies:\n  - 10.0.0.0/8\n  - 10.0.0.1/8\n  - proxy\n")
    assert len(e.value.problems) == 2
    assert e.value.problems[0].startswith(f"{tmp_path / 'portal.yaml'}:4: '10.0.0.1/8' is not a network")
    assert e.value.problems[1].startswith(f"{tmp_path / 'portal.yaml'}:5: 'proxy' is not a network")
    with pytest.raises(ValueError):
        networks(["10.0.0.1/8"])
    assert ipaddress.ip_address("10.9.9.9") in TRUSTED[1]


async def test_behind_a_trusted_proxy_every_resident_has_a_bucket_of_their_own(tmp_path: Path) -> None:
    extra = (
        "trusted_proxies: [127.0.0.1]\nphone: {bad_codes_per_10min: 3, scans_per_min: 1000}\n"
        "public_url: https://wy.example.cn\n"
    )  # plates print to it
    async with running_portal(write_config(tmp_path, None, extra=extra)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        good = await plate_code(p, "3", "2", "301")
        guesser = {"X-Forwarded-For": "6.6.6.6, 203.0.113.7"}  # the proxy appended the guesser's real address
        statuses = [(await p.client.get(f"/p/{reg.new_plate_code()}", headers=guesser)).status for _ in range(5)]
        assert statuses == [404, 404, 404, 429, 429]
        assert (await p.client.get(f"/p/{good}", headers=guesser)).status == 429
        # Everybody else behind the same proxy is served, even one who claims to be the guesser.
        for xff in ("203.0.113.8", "203.0.113.7, 203.0.113.8", "6.6.6.6, 198.51.100.20"):
            assert (await p.client.get(f"/p/{good}", headers={"X-Forwarded-For": xff})).status == 200, xff
        assert (await p.client.get(f"/p/{good}")).status == 200  # the proxy itself
        # The audit trail names the client too, not the proxy.
        bid = await p.services.store.read(
            lambda c: c.execute("SELECT id FROM reg_buildings WHERE code = '3'").fetchone()[0]
        )
        r = await p.client.get(
            f"/admin/registry/buildings/{bid}/sheet.pdf", headers={"X-Forwarded-For": "198.51.100.4"}
        )
        assert r.status == 200
        remote = await p.services.store.read(
            lambda c: c.execute("SELECT remote FROM audit WHERE action = 'plates.print'").fetchone()[0]
        )
        assert remote == "198.51.100.4"


@pytest.mark.parametrize("trusted", ["", "trusted_proxies: [10.0.0.0/8, '::1']\n"], ids=["none", "elsewhere"])
async def test_a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(tmp_path: Path, trusted: str) -> None:
    extra = trusted + "phone: {bad_codes_per_10min: 3, scans_per_min: 1000}\n"
    async with running_portal(write_config(tmp_path, None, extra=extra)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        good = await plate_code(p, "3", "2", "301")
        statuses = [
            (await p.client.get(f"/p/{reg.new_plate_code()}", headers={"X-Forwarded-For": f"203.0.113.{i}"})).status
            for i in range(5)
        ]
        assert statuses == [404, 404, 404, 429, 429]  # a fresh made-up address each time bought nothing
        assert (await p.client.get(f"/p/{good}", headers={"X-Forwarded-For": "198.51.100.1"})).status == 429


async def test_an_unknown_code_takes_as_long_as_a_withdrawn_one(tmp_path: Path) -> None:
    """Median latencies within a factor of 1.5. The requests go in pairs, one of each in random order, so
    a burst of load on a shared machine falls on both alike; a round that still comes out lopsided is
    measured again (three rounds at most). A different path for withdrawn codes (another query, a hash,
    a redirect) is lopsided every round: half a millisecond more fails it; scheduling noise does not."""
    extra = "phone: {bad_codes_per_10min: 10000, scans_per_min: 100000}\n"
    async with running_portal(write_config(tmp_path, None, extra=extra)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        hid = await house_id(p, "3", "2", "301")
        withdrawn = await plate_code(p, "3", "2", "301")
        assert (
            await form(p, "/admin/registry/plates/reissue", {"kind": "house", "id": str(hid), "confirmed": "yes"}, csrf)
        ).status == 303
        assert await plate_code(p, "3", "2", "301") != withdrawn

        async def fetch(kind: str) -> float:
            code = withdrawn if kind == "withdrawn" else reg.new_plate_code()
            t0 = time.perf_counter()
            r = await p.client.get(f"/p/{code}")
            await r.read()
            dt = time.perf_counter() - t0
            assert r.status == 404
            return dt

        rnd = random.Random(5)
        for _ in range(10):  # warm up: templates, statements, the buckets
            await fetch("withdrawn")
            await fetch("unknown")
        rounds = []
        for _ in range(3):
            times: dict[str, list[float]] = {"withdrawn": [], "unknown": []}
            for _ in range(60):
                pair = ["withdrawn", "unknown"]
                rnd.shuffle(pair)
                for kind in pair:
                    times[kind].append(await fetch(kind))
            med = {k: statistics.median(v) for k, v in times.items()}
            rounds.append({k: f"{v * 1000:.2f} ms" for k, v in med.items()})
            if max(med.values()) / min(med.values()) < 1.5:
                break
        else:
            raise AssertionError(f"withdrawn and unknown codes answer at different speeds: {rounds}")
