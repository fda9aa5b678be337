"""The one contract between gateway and portal: MQTT topics and message schemas (topics v1; commands v2).

Everything that crosses the broker is defined here and nowhere else. The portal imports this
module and nothing else of the gateway.

Topics, all under ``gatehouse/v1/<site>/<gateway>/``:

=============  =========  ===========  ==================================================
suffix         direction  QoS/retain   payload
=============  =========  ===========  ==================================================
``events``     gw → pt    1            :class:`EventBatch`: one or more events, seq order
``ack``        pt → gw    1            :class:`Ack`: the seqs the portal has *stored*
``cmd``        pt → gw    1            a :class:`Command` in a signed envelope (v2, wire.commands)
``status``     gw → all   1, retained  :class:`Status`; "offline" is the MQTT last will
=============  =========  ===========  ==================================================

A command is answered by an ordinary event of type ``command.result`` (so results are as durable
as any event) whose ``data`` carries ``command_id``, ``ok`` and ``detail``.

Versions: events, acks and status are v1 (:data:`SCHEMA_VERSION`). Commands are v2
(:data:`COMMAND_VERSION`): a :class:`Command` travels inside a signed envelope
(:mod:`gateway.wire.commands`) that names its target site and gateway, signed with the portal's
key; a gateway refuses a bare v1 command as ``unsigned``. The broker password alone therefore
commands nothing.

Delivery is at-least-once end to end: the gateway keeps each event in its outbox until an
:class:`Ack` names its seq, re-sending meanwhile; the portal stores by event id idempotently and
acknowledges again on a re-send. Sequence numbers are per gateway, start at 1 and have no gaps,
so the portal can notice a missing one. Urgent events (priority TAMPER and up) are sent ahead of
routine ones queued before them, so batches may arrive out of seq order: only a gap that stays open
means something is missing.

Decoding is strict: unknown fields, wrong types, a wrong schema version or an oversized payload
raise :class:`WireError` with a short reason, which receivers count and log once.
"""

from __future__ import annotations

import base64
import enum
import os
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec

SCHEMA_VERSION = 1
#: Commands only: a signed envelope around the command (gateway.wire.commands). v1 commands were unsigned.
COMMAND_VERSION = 2
#: The longest a command may stay valid (expires - ts); a gateway refuses a longer one. Gateways keep the ids
#: of commands they ran at least this long, so a signed command can never be replayed while it is valid.
MAX_COMMAND_LIFE_S = 3600
TOPIC_ROOT = "gatehouse/v1"
#: Largest payload a receiver will even try to decode. Mosquitto is configured with the same limit.
MAX_PAYLOAD_BYTES = 256 * 1024
#: Most events one batch may carry (a batch of this many typical events is ~100 kB).
MAX_BATCH = 500

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
NAME_RE = re.compile(rf"^{_NAME}$")

#: Event and command types are dotted lower-case names: ``zone.alarm``, ``access.denied``.
EventType = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$", max_length=64)]


class WireError(ValueError):
    """A payload or topic that does not follow this contract. ``reason`` is a short, stable key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Priority(enum.IntEnum):
    """Higher is more urgent. Fire > panic/medical > intrusion > tamper > fault > routine."""

    ROUTINE = 0
    FAULT = 10
    TAMPER = 20
    INTRUSION = 30
    PANIC = 40
    FIRE = 50


#: Why a door did not open: ``data.reason`` of ``door.unlock_failed`` and of a failed ``unlock`` command's
#: ``command.result``. ``relay_not_moved``: the controller answered, the relay read back unmoved (a board in
#: another control mode); ``unconfirmed``: answered, but the read-back got no answer; ``no_answer``,
#: ``bus_down``: the controller could not be reached; ``refused``: it answered with a Modbus exception;
#: ``rejected``: the gateway's own configuration makes the write impossible.
UNLOCK_FAILURES = ("relay_not_moved", "unconfirmed", "no_answer", "bus_down", "refused", "rejected")


class Place(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """Where in the estate an event happened. Only the fields that apply are set."""

    site: str
    building: str | None = None
    unit: str | None = None
    house: str | None = None
    zone: str | None = None
    door: str | None = None


class Event(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """One thing that happened at a gateway.

    ``type`` is a dotted name (``zone.alarm``, ``zone.restore``, ``device.offline``, ``access.granted``,
    ``command.result``...); ``data`` carries the type's own details as plain JSON values.
    """

    id: str  # ULID: time-ordered and unique across gateways
    seq: int  # per gateway, 1, 2, 3... with no gaps
    ts: datetime  # UTC wall time when it happened
    type: EventType
    device: str  # source device name ("gateway" for the gateway itself)
    place: Place
    point: str | None = None  # source point on the device (an input, a relay, a reader line)
    priority: int = Priority.ROUTINE
    data: dict[str, Any] = {}


class _BatchHead(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    v: int
    site: str
    gateway: str


class EventBatch(_BatchHead, frozen=True):
    events: list[Event]


class _FramedBatch(_BatchHead, frozen=True):
    """An :class:`EventBatch` whose events are already encoded (see :func:`encode_framed`)."""

    events: msgspec.Raw  # a JSON array of encoded Events


class Ack(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The portal has durably stored these events (by seq) and the gateway may forget them."""

    v: int
    seqs: list[int]


class Command(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """An order from the portal. ``expires`` bounds how late a gateway may still carry it out.

    ``site`` and ``gateway`` name the one gateway it is for (v2; set by the portal when it signs), so a
    command signed for one gateway is refused by every other. ``id`` is unique (a ULID) and is the nonce a
    gateway remembers against replay."""

    v: int
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    type: str  # "unlock", "arm", "disarm", "credentials.sync", ...
    ts: datetime
    expires: datetime
    by: str  # the portal user who gave it, for the audit trail
    args: dict[str, Any] = {}
    site: str = ""
    gateway: str = ""


class Status(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """``fault`` (optional, added within v1, omitted when empty): a standing gateway fault that cannot wait
    in the outbox, such as a store that cannot write (a full SD card); cleared by the next status without it."""

    v: int
    state: Literal["online", "offline"]
    ts: datetime | None = None
    version: str = ""
    fault: Annotated[str, msgspec.Meta(max_length=500)] = ""


# ---------------------------------------------------------------- topics


def _check_name(kind: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise WireError("bad-name", f"{kind} {value!r} must match {NAME_RE.pattern}")
    return value


def topic(site: str, gateway: str, suffix: Literal["events", "ack", "cmd", "status"]) -> str:
    return f"{TOPIC_ROOT}/{_check_name('site', site)}/{_check_name('gateway', gateway)}/{suffix}"


def subscription(suffix: str, site: str = "+", gateway: str = "+") -> str:
    """A filter for one suffix on every (or one) site and gateway: ``gatehouse/v1/+/+/events``."""
    return f"{TOPIC_ROOT}/{site}/{gateway}/{suffix}"


def parse_topic(value: str) -> tuple[str, str, str]:
    """``gatehouse/v1/<site>/<gateway>/<suffix>`` → (site, gateway, suffix)."""
    parts = value.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        raise WireError("bad-topic", value[:200])
    site, gw, suffix = parts[2], parts[3], parts[4]
    _check_name("site", site)
    _check_name("gateway", gw)
    return site, gw, suffix


# ---------------------------------------------------------------- encoding

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def encode(msg: EventBatch | Event | Ack | Command | Status) -> bytes:
    return _encoder.encode(msg)


def encode_framed(site: str, gateway: str, events: Iterable[bytes]) -> bytes:
    """An event batch from events already encoded (the gateway's outbox keeps each as ``encode(event)``): the same
    bytes as ``encode(batch_events(site, gateway, events))``, but each event is framed as it is, not decoded and
    encoded again."""
    array = msgspec.Raw(b"[" + b",".join(events) + b"]")
    return _encoder.encode(_FramedBatch(v=SCHEMA_VERSION, site=site, gateway=gateway, events=array))


T = TypeVar("T")


def _decode(cls: type[T], payload: bytes | bytearray | memoryview, *, version: int = SCHEMA_VERSION) -> T:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError("too-large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    # A cheap look at the version first, so a v2 sender gets "bad-version", not a schema error.
    try:
        head = msgspec.json.decode(payload, type=_Versioned)
    except msgspec.ValidationError as e:  # a subclass of DecodeError: test it first
        raise WireError("schema", str(e)[:200]) from None
    except msgspec.DecodeError as e:
        raise WireError("malformed", str(e)[:200]) from None
    except RecursionError:  # msgspec's answer to JSON nested a thousand deep
        raise WireError("malformed", "nested too deeply") from None
    except UnicodeDecodeError:  # msgspec's answer to a string (even a key it skips) that is not UTF-8
        raise WireError("malformed", "a string is not UTF-8") from None
    if head.v != version:
        raise WireError("bad-version", f"v={head.v}, this side speaks v={version}")
    dec: msgspec.json.Decoder[T] | None = _decoders.get(cls)
    if dec is None:
        dec = _decoders[cls] = msgspec.json.Decoder(cls)
    try:
        return dec.decode(payload)
    except msgspec.ValidationError as e:
        raise WireError("schema", str(e)[:200]) from None
    except msgspec.DecodeError as e:
        raise WireError("malformed", str(e)[:200]) from None
    except RecursionError:
        raise WireError("malformed", "nested too deeply") from None
    except UnicodeDecodeError:
        raise WireError("malformed", "a string is not UTF-8") from None


class _Versioned(msgspec.Struct):
    v: int


def decode_batch(payload: bytes, *, site: str, gateway: str) -> EventBatch:
    """Decode and check an event batch received on ``site``/``gateway``'s events topic."""
    batch = _decode(EventBatch, payload)
    if batch.site != site or batch.gateway != gateway:
        raise WireError("topic-mismatch", f"payload says {batch.site}/{batch.gateway}")
    if not batch.events:
        raise WireError("schema", "empty batch")
    if len(batch.events) > MAX_BATCH:
        raise WireError("schema", f"{len(batch.events)} events > {MAX_BATCH}")
    prev = 0
    for ev in batch.events:
        if ev.seq <= prev:
            raise WireError("schema", "seqs must be positive and increasing within a batch")
        prev = ev.seq
        if ev.ts.tzinfo is None or ev.ts.utcoffset() != UTC.utcoffset(None):
            raise WireError("schema", f"event {ev.id}: ts must be UTC")
        if ev.place.site != site:
            raise WireError("schema", f"event {ev.id}: place.site {ev.place.site!r} != {site!r}")
    return batch


def decode_ack(payload: bytes) -> Ack:
    ack = _decode(Ack, payload)
    if any(s <= 0 for s in ack.seqs):
        raise WireError("schema", "seqs must be positive")
    return ack


def decode_command_body(payload: bytes) -> Command:
    """Decode the (already verified) body of a signed command; see :func:`gateway.wire.commands.open_command`."""
    cmd = _decode(Command, payload, version=COMMAND_VERSION)
    if cmd.expires.tzinfo is None or cmd.ts.tzinfo is None:
        raise WireError("schema", "ts and expires must carry a timezone (UTC)")
    return cmd


def decode_status(payload: bytes) -> Status:
    return _decode(Status, payload)


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD.encode())
_last_id = [-1, 0]  # (ms, random part) of the last id made


def new_id(at: datetime | None = None) -> str:
    """A ULID (the ``id`` of events and incidents): 48 bits of Unix time in ms (``at``, or now), 80 random bits, in
    Crockford's base 32; within one millisecond each id is the last one's plus one, so ids made in order sort in
    order (as python-ulid's do). The daemon's own few lines rather than python-ulid, whose import pulls in
    importlib.metadata and its dependencies (some 2 MB resident on the Pi); the same strings (see tests/test_wire)."""
    ms = int((at.timestamp() if at is not None else time.time()) * 1000) & 0xFFFF_FFFF_FFFF
    rnd = _last_id[1] + 1 if ms == _last_id[0] and _last_id[1] < 2**80 - 1 else int.from_bytes(os.urandom(10), "big")
    _last_id[:] = [ms, rnd]
    # 130 bits (two leading zeros) as 26 letters: shifted to 160 bits, base32 in C, its alphabet turned Crockford's.
    return base64.b32encode((ms << 110 | rnd << 30).to_bytes(20, "big"))[:26].translate(_TO_CROCKFORD).decode()


def utcnow() -> datetime:
    return datetime.now(UTC)


def batch_events(site: str, gateway: str, events: list[Event]) -> EventBatch:
    return EventBatch(v=SCHEMA_VERSION, site=site, gateway=gateway, events=events)
