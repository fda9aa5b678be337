"""The wire contract: round trips and every kind of rejection, from byte tables."""

from __future__ import annotations

import base64
import json
import os
import time
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from gateway import wire
from gateway.wire.commands import open_command, peek_command, sign_command
from gateway.wire.passes import generate_keypair, keyring


def _event(seq: int = 1, **kw: object) -> wire.Event:
    base: dict[str, object] = dict(
        id=f"01JABCDEFGHJKMNPQRSTVWXY{seq:02d}"[:26],
        seq=seq,
        ts=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        type="zone.alarm",
        device="panel-1",
        place=wire.Place(site="s1", zone="z1"),
        point="in1",
        priority=wire.Priority.INTRUSION,
    )
    base.update(kw)
    return wire.Event(**base)  # type: ignore[arg-type]


def test_batch_round_trip() -> None:
    batch = wire.batch_events("s1", "gw1", [_event(1), _event(2, data={"n": 2})])
    back = wire.decode_batch(wire.encode(batch), site="s1", gateway="gw1")
    assert back == batch


@pytest.mark.parametrize("n", [1, 2, 7])
def test_a_batch_framed_from_encoded_events_is_the_encoded_batch(n: int) -> None:
    """The gateway's outbox keeps each event encoded and frames a batch from those bytes: what it sends is byte for
    byte the encoded EventBatch, and the portal's decoder reads back the very events."""
    events = [_event(i, data={"n": i, "text": 'a "quoted" ü'}) for i in range(1, n + 1)]
    framed = wire.encode_framed("s1", "gw1", [wire.encode(ev) for ev in events])
    assert framed == wire.encode(wire.batch_events("s1", "gw1", events))
    assert wire.decode_batch(framed, site="s1", gateway="gw1").events == events


def test_topics() -> None:
    assert wire.topic("s1", "gw1", "events") == "gatehouse/v1/s1/gw1/events"
    assert wire.parse_topic("gatehouse/v1/s1/gw1/ack") == ("s1", "gw1", "ack")
    with pytest.raises(wire.WireError) as e:
        wire.topic("s/1", "gw1", "events")
    assert e.value.reason == "bad-name"
    for bad in ["gatehouse/v2/s1/gw1/events", "gatehouse/v1/s1/events", "x", "gatehouse/v1/+/gw/events"]:
        with pytest.raises(wire.WireError):
            wire.parse_topic(bad)


def _raw(obj: object) -> bytes:
    return msgspec.json.encode(obj)


GOOD = msgspec.to_builtins(wire.batch_events("s1", "gw1", [_event(1)]))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b"[]", "schema"),
        (b"null", "schema"),
        (_raw({**GOOD, "v": 2}), "bad-version"),
        (_raw({**GOOD, "v": "1"}), "schema"),
        (_raw({**GOOD, "extra": 1}), "schema"),
        (_raw({**GOOD, "events": []}), "schema"),
        (_raw({**GOOD, "gateway": "gw2"}), "topic-mismatch"),
        (_raw({**GOOD, "events": [{**GOOD["events"][0], "seq": "x"}]}), "schema"),
        (_raw({**GOOD, "events": [{**GOOD["events"][0], "type": "Zone Alarm"}]}), "schema"),
        (_raw({**GOOD, "events": [GOOD["events"][0], GOOD["events"][0]]}), "schema"),  # seq not increasing
        (_raw({**GOOD, "events": [{**GOOD["events"][0], "place": {"site": "other"}}]}), "schema"),
        (_raw({**GOOD, "events": [{**GOOD["events"][0], "ts": "2026-01-02T03:04:05"}]}), "schema"),
        (b" " * (wire.MAX_PAYLOAD_BYTES + 1), "too-large"),
    ],
)
def test_batch_rejections(payload: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.decode_batch(payload, site="s1", gateway="gw1")
    assert e.value.reason == reason


def test_non_utc_offset_is_rejected() -> None:
    ev = msgspec.to_builtins(_event(1))
    ev["ts"] = datetime(2026, 1, 2, 11, 4, 5, tzinfo=timezone(timedelta(hours=8))).isoformat()
    with pytest.raises(wire.WireError, match="UTC"):
        wire.decode_batch(_raw({**GOOD, "events": [ev]}), site="s1", gateway="gw1")


def test_ack() -> None:
    assert wire.decode_ack(wire.encode(wire.Ack(v=1, seqs=[1, 2, 3]))).seqs == [1, 2, 3]
    with pytest.raises(wire.WireError):
        wire.decode_ack(_raw({"v": 1, "seqs": [0]}))


# ---------------------------------------------------------------- signed commands (v2)

PORTAL_KEY, PORTAL_PUB = generate_keypair()
RING = keyring([PORTAL_PUB])


def _cmd(**kw: object) -> wire.Command:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    base: dict[str, object] = dict(
        v=wire.COMMAND_VERSION,
        id="01JABCDEFGHJKMNPQRSTVWXY00",
        type="unlock",
        ts=now,
        expires=now + timedelta(seconds=30),
        by="guard:bob",
        args={"door": "d1", "reason": "courier"},
    )
    base.update(kw)
    return wire.Command(**base)  # type: ignore[arg-type]


def test_a_signed_command_opens_only_at_its_own_gateway() -> None:
    payload = sign_command(PORTAL_KEY, _cmd(), site="s1", gateway="gw1")
    cmd = open_command(payload, RING, site="s1", gateway="gw1")
    assert (cmd.v, cmd.site, cmd.gateway, cmd.args) == (2, "s1", "gw1", {"door": "d1", "reason": "courier"})
    assert cmd == msgspec.structs.replace(_cmd(), site="s1", gateway="gw1")
    for site, gw in (("s1", "gw2"), ("s2", "gw1")):
        with pytest.raises(wire.WireError) as e:
            open_command(payload, RING, site=site, gateway=gw)
        assert (e.value.reason, e.value.detail) == ("wrong-gateway", "signed for s1/gw1")


def _envelope(payload: bytes, **change: object) -> bytes:
    env = json.loads(payload)
    env.update(change)
    return json.dumps(env).encode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


GOOD_CMD = sign_command(PORTAL_KEY, _cmd(), site="s1", gateway="gw1")
_BODY = base64.b64decode(json.loads(GOOD_CMD)["body"])


@pytest.mark.parametrize(
    "payload,reason",
    [
        (wire.encode(_cmd(v=1)), "unsigned"),  # what the broker password alone could publish before v2
        (_raw({"v": 1, "id": "c1", "type": "unlock"}), "unsigned"),
        (_raw({"v": 3, "kid": "00000000"}), "bad-version"),
        (b"unlock d1", "malformed"),
        (b"", "malformed"),
        (b"[1, 2]", "schema"),
        (_envelope(GOOD_CMD, extra=1), "schema"),
        (_envelope(GOOD_CMD, sig="not base64!"), "schema"),
        (_envelope(GOOD_CMD, sig=_b64(b"\0" * 63)), "schema"),
        (_envelope(GOOD_CMD, kid="ABCDEF01"), "schema"),
        (_envelope(GOOD_CMD, kid="00000000"), "unknown-key"),
        (sign_command(generate_keypair()[0], _cmd(), site="s1", gateway="gw1"), "unknown-key"),
        (_envelope(GOOD_CMD, sig=_b64(b"\0" * 64)), "bad-signature"),
        # the body changed after signing: another door, another gateway, a later expiry
        (_envelope(GOOD_CMD, body=_b64(_BODY.replace(b'"d1"', b'"d2"'))), "bad-signature"),
        (_envelope(GOOD_CMD, body=_b64(_BODY.replace(b'"gw1"', b'"gw2"'))), "bad-signature"),
        (_envelope(GOOD_CMD, body=_b64(_BODY.replace(b"03:04:35", b"23:04:35"))), "bad-signature"),
        # a signature over a pass or a revocation list never verifies as a command
        (
            _envelope(
                GOOD_CMD, sig=_b64(PORTAL_KEY.sign(b"GH1:" + bytes.fromhex(json.loads(GOOD_CMD)["kid"]) + _BODY))
            ),
            "bad-signature",
        ),
        (b" " * (wire.MAX_PAYLOAD_BYTES + 1), "too-large"),
        (b"{" * 100_000, "malformed"),
    ],
)
def test_command_refusals(payload: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError) as e:
        open_command(payload, RING, site="s1", gateway="gw1")
    assert e.value.reason == reason, e.value


def test_the_portal_signs_nothing_a_gateway_would_refuse() -> None:
    too_long = _cmd(expires=_cmd().ts + timedelta(seconds=wire.MAX_COMMAND_LIFE_S + 1))
    with pytest.raises(ValueError, match="at most 3600 s"):
        sign_command(PORTAL_KEY, too_long, site="s1", gateway="gw1")
    with pytest.raises(wire.WireError):
        sign_command(PORTAL_KEY, _cmd(), site="s/1", gateway="gw1")
    naive = _cmd(ts=datetime(2026, 1, 2, 3, 4, 5), expires=datetime(2026, 1, 2, 3, 5, 5))
    with pytest.raises(ValueError, match="timezone"):
        sign_command(PORTAL_KEY, naive, site="s1", gateway="gw1")


def test_a_signed_body_a_gateway_cannot_read_is_refused_after_its_signature() -> None:
    """Signed by the portal yet invalid (a portal bug): schema, never carried out."""
    kid = json.loads(GOOD_CMD)["kid"]
    body = _BODY.replace(b'"ts":"2026-01-02T03:04:05Z"', b'"ts":"2026-01-02T03:04:05"')
    env = _envelope(GOOD_CMD, body=_b64(body), sig=_b64(PORTAL_KEY.sign(b"GC2:" + bytes.fromhex(kid) + body)))
    with pytest.raises(wire.WireError) as e:
        open_command(env, RING, site="s1", gateway="gw1")
    assert e.value.reason == "schema"
    long_body = _BODY.replace(b'"expires":"2026-01-02T03:04:35Z"', b'"expires":"2026-01-02T05:04:35Z"')
    env = _envelope(GOOD_CMD, body=_b64(long_body), sig=_b64(PORTAL_KEY.sign(b"GC2:" + bytes.fromhex(kid) + long_body)))
    with pytest.raises(wire.WireError) as e:
        open_command(env, RING, site="s1", gateway="gw1")
    assert e.value.reason == "too-long"


def test_what_a_refused_command_claims_is_readable_for_the_guards() -> None:
    assert peek_command(wire.encode(_cmd(v=1))) == {
        "id": "01JABCDEFGHJKMNPQRSTVWXY00",
        "type": "unlock",
        "by": "guard:bob",
        "door": "d1",
    }
    assert peek_command(GOOD_CMD) == {
        "id": "01JABCDEFGHJKMNPQRSTVWXY00",
        "type": "unlock",
        "by": "guard:bob",
        "for": "s1/gw1",
        "door": "d1",
    }
    for junk in (b"", b"\xff\xfe", b"[]", b'{"v": 2, "body": "!!"}', b"{" * 10_000, _raw({"id": 5})):
        assert peek_command(junk) == {}
    assert len(peek_command(_raw({"v": 1, "type": "x" * 500}))["type"]) == 64


def test_status() -> None:
    st = wire.Status(v=1, state="offline")
    assert wire.decode_status(wire.encode(st)) == st
    with pytest.raises(wire.WireError):
        wire.decode_status(_raw({"v": 1, "state": "sleeping"}))


def test_new_id_is_the_ulid_of_its_time_and_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway makes ULIDs itself: the same 26 characters python-ulid makes of the same time and random bits."""
    from ulid import ULID

    for ms, rnd in (
        (0, bytes(10)),
        (1, b"\xff" * 10),
        (253_402_300_799_999, bytes(range(10))),
        (1_765_000_000_123, os.urandom(10)),
    ):
        monkeypatch.setattr(wire.os, "urandom", lambda n, rnd=rnd: rnd)
        at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
        got = wire.new_id(at)
        assert got == str(ULID.from_bytes(ms.to_bytes(6, "big") + rnd)), (ms, rnd)
        assert ULID.from_str(got).milliseconds == ms
    monkeypatch.undo()
    a, b = wire.new_id(), wire.new_id()
    assert a != b and len(a) == 26 and abs(ULID.from_str(a).milliseconds - time.time() * 1000) < 5000
