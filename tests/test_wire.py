"""The wire contract: round trips and every kind of rejection, from byte tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from gateway import wire


def _event(seq: int = 1, **kw: object) -> wire.Event:
    base: dict[str, object] = dict(
        id=f"01JABCDEFGHJKMNPQRSTVWXY{seq:02d}"[:26], seq=seq, ts=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        type="zone.alarm", device="panel-1", place=wire.Place(site="s1", zone="z1"), point="in1",
        priority=wire.Priority.INTRUSION,
    )
    base.update(kw)
    return wire.Event(**base)  # type: ignore[arg-type]


def test_batch_round_trip() -> None:
    batch = wire.batch_events("s1", "gw1", [_event(1), _event(2, data={"n": 2})])
    back = wire.decode_batch(wire.encode(batch), site="s1", gateway="gw1")
    assert back == batch


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


def test_ack_and_command() -> None:
    assert wire.decode_ack(wire.encode(wire.Ack(v=1, seqs=[1, 2, 3]))).seqs == [1, 2, 3]
    with pytest.raises(wire.WireError):
        wire.decode_ack(_raw({"v": 1, "seqs": [0]}))
    now = wire.utcnow()
    cmd = wire.Command(v=1, id="c1", type="unlock", ts=now, expires=now + timedelta(seconds=30), by="guard1",
                       args={"door": "d1"})
    assert wire.decode_command(wire.encode(cmd)) == cmd
    with pytest.raises(wire.WireError):
        wire.decode_command(_raw({"v": 1, "id": "c1", "type": "unlock", "ts": "2026-01-01T00:00:00",
                                  "expires": "2026-01-01T00:00:30", "by": "x"}))


def test_status() -> None:
    st = wire.Status(v=1, state="offline")
    assert wire.decode_status(wire.encode(st)) == st
    with pytest.raises(wire.WireError):
        wire.decode_status(_raw({"v": 1, "state": "sleeping"}))
