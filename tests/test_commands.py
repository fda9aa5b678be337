"""The gateway's command guard (gateway.commands) on a real store: what a holder of the broker password can and
cannot make a gateway do, and how refusals are reported without letting a flood fill the disk.

Time is driven (a clock the test steps); the store is a real SQLite file, so replay protection survives a
restart as it does on the Pi.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from ulid import ULID

from gateway import wire
from gateway.commands import CommandGuard, Refusal
from gateway.store import Store
from gateway.wire.commands import sign_command
from gateway.wire.passes import generate_keypair, keyring

SITE, GW = "s1", "gw1"
KEY, PUB = generate_keypair()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def command(
    type_: str = "unlock", *, site: str = SITE, gateway: str = GW, key: Any = KEY, life_s: float = 30, **args: Any
) -> tuple[bytes, str]:
    now = wire.utcnow()
    cid = str(ULID())
    cmd = wire.Command(
        v=wire.COMMAND_VERSION,
        id=cid,
        type=type_,
        ts=now,
        expires=now + timedelta(seconds=life_s),
        by="guard:bob",
        args=args or {"door": "b3-u2", "reason": "courier"},
    )
    return sign_command(key, cmd, site=site, gateway=gateway), cid


def unsigned(type_: str = "unlock", **args: Any) -> bytes:
    now = wire.utcnow()
    return wire.encode(
        wire.Command(
            v=1,
            id=str(ULID()),
            type=type_,
            ts=now,
            expires=now + timedelta(seconds=30),
            by="intruder",
            args=args or {"door": "b3-u2", "reason": "x"},
        )
    )


async def test_only_a_command_signed_for_this_gateway_is_admitted_and_only_once(tmp_path: Path) -> None:
    async with Store(tmp_path / "gw.db", site=SITE, gateway=GW) as store:
        guard = CommandGuard(SITE, GW, keyring([PUB]), seen=store.seen_command)
        payload, cid = command()
        cmd = await guard.admit(payload)
        assert isinstance(cmd, wire.Command) and (cmd.id, cmd.type, cmd.args["door"]) == (cid, "unlock", "b3-u2")
        # The same bytes again (a copy, or the broker's re-delivery): refused, whatever the route.
        again = await guard.admit(payload)
        assert isinstance(again, Refusal) and again.reason == "replayed" and again.priority == wire.Priority.ROUTINE
        other_gw, _ = command(gateway="gw2")
        other_site, _ = command(site="s2")
        other_key, _ = command(key=generate_keypair()[0])
        for payload, reason in (
            (unsigned(), "unsigned"),
            (other_gw, "wrong-gateway"),
            (other_site, "wrong-gateway"),
            (other_key, "unknown-key"),
            (b"open sesame", "malformed"),
        ):
            r = await guard.admit(payload)
            assert isinstance(r, Refusal) and r.reason == reason and r.priority == wire.Priority.TAMPER, (reason, r)
        assert guard.refused == {"replayed": 1, "unsigned": 1, "wrong-gateway": 2, "unknown-key": 1, "malformed": 1}

    # After a restart (a fresh guard, the same store file) the copy is still refused.
    async with Store(tmp_path / "gw.db", site=SITE, gateway=GW) as store:
        guard = CommandGuard(SITE, GW, keyring([PUB]), seen=store.seen_command)
        r = await guard.admit(payload := command()[0])
        assert isinstance(r, wire.Command)
    async with Store(tmp_path / "gw.db", site=SITE, gateway=GW) as store:
        guard = CommandGuard(SITE, GW, keyring([PUB]), seen=store.seen_command)
        r = await guard.admit(payload)
        assert isinstance(r, Refusal) and r.reason == "replayed"


async def test_a_copy_is_refused_even_while_the_store_cannot_write(tmp_path: Path) -> None:
    """A full disk makes store.seen_command answer "not seen" (the unlock must still run once); the guard's own
    memory refuses the copy."""

    async def disk_full(cid: str, ts: Any) -> bool:
        return False  # what Store.seen_command answers when its INSERT fails

    guard = CommandGuard(SITE, GW, keyring([PUB]), seen=disk_full)
    payload, _ = command()
    assert isinstance(await guard.admit(payload), wire.Command)
    r = await guard.admit(payload)
    assert isinstance(r, Refusal) and r.reason == "replayed"


async def test_a_gateway_without_the_portal_key_runs_nothing(tmp_path: Path) -> None:
    async with Store(tmp_path / "gw.db", site=SITE, gateway=GW) as store:
        guard = CommandGuard(SITE, GW, {}, seen=store.seen_command)
        r = await guard.admit(command()[0])
        assert isinstance(r, Refusal) and r.reason == "unknown-key"


def test_refusals_are_folded_per_reason_so_a_flood_cannot_fill_the_disk() -> None:
    mono = Clock()
    guard = CommandGuard(SITE, GW, {}, seen=lambda *_: None, mono=mono, fold_s=60)  # type: ignore[arg-type,return-value]
    forged = Refusal("bad-signature", "kid 1a2b3c4d", {"id": "c1", "type": "unlock", "door": "b3-u2"})
    first = guard.report(forged)
    assert [(d.type, d.priority, d.data) for d in first] == [
        (
            "command.rejected",
            wire.Priority.TAMPER,
            {
                "reason": "bad-signature",
                "detail": "kid 1a2b3c4d",
                "count": 1,
                "command_id": "c1",
                "command": "unlock",
                "door": "b3-u2",
            },
        )
    ]
    assert guard.next_flush() is None  # nothing folded yet
    for i in range(999):
        mono.t += 0.01
        assert guard.report(Refusal("bad-signature", f"kid {i}", {"door": "b3-u1"})) == []
    # Another reason has its own window: reported at once.
    (unsig,) = guard.report(Refusal("unsigned", "a v1 command carries no signature"))
    assert unsig.data["reason"] == "unsigned" and unsig.data["count"] == 1
    assert guard.next_flush() == 1060.0
    mono.t = 1059.9
    assert guard.flush() == []
    mono.t = 1060.0
    (summary,) = guard.flush()
    assert summary.priority == wire.Priority.TAMPER
    assert summary.data == {
        "reason": "bad-signature",
        "detail": "kid 998",
        "count": 999,
        "folded": True,
        "window_s": 60,
        "door": "b3-u1",
    }
    assert guard.next_flush() is None
    # The window is over: the next forgery is reported at once again.
    mono.t = 1061.0
    assert [d.data["count"] for d in guard.report(forged)] == [1]


def test_a_window_ended_without_a_flush_is_reported_with_the_next_refusal() -> None:
    mono = Clock()
    guard = CommandGuard(SITE, GW, {}, seen=lambda *_: None, mono=mono, fold_s=60)  # type: ignore[arg-type,return-value]
    guard.report(Refusal("unsigned", "x"))
    guard.report(Refusal("unsigned", "y"))
    mono.t += 120
    drafts = guard.report(Refusal("unsigned", "z"))
    assert [(d.data["count"], d.data.get("folded", False), d.data["detail"]) for d in drafts] == [
        (1, True, "y"),
        (1, False, "z"),
    ]
