"""The grid contract, version 1: what goes up to the district's grid-governance platform and what comes back.

docs/grid.md is the contract for the platform's side, with examples; this module is the portal's reading of it,
validated with msgspec at the edge in both directions. The grid-platform stub (firmware_stubs/grid_platform.py)
is an independent implementation of the other side, written from docs/grid.md, not from this module.

Signing (both directions, one shared key): ``X-Grid-Signature: hmac-sha256=<hex>`` over
``"<timestamp>\\n<METHOD>\\n<path>\\n"`` followed by the body's bytes, with ``X-Grid-Timestamp`` (unix seconds)
and ``X-Grid-Key-Id`` (who signs). The method and path are part of the signed text, so a record the portal sent
up cannot be played back to the portal as a status callback.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Annotated, Final, Literal, get_args

import msgspec

SCHEMA_EVENT: Final = "gatehouse.grid.event"
SCHEMA_STATUS: Final = "gatehouse.grid.status"
VERSION: Final = 1

#: Where an event came from (the platforms' 事件来源 values) by our code.
SOURCES = {"iot": "物联网感知", "resident": "居民上报", "guard": "保安上报"}
#: The case flow of GB/T 30428.8: each of the estate's steps is put under one of these stages.
Stage = Literal["上报", "立案", "派遣", "处置", "核查", "结案"]
STAGES: tuple[Stage, ...] = get_args(Stage)
#: The platform's status of a case, and how the estate's people read it.
STATUSES = {"accepted": "已受理", "dispatched": "已派遣", "handling": "处置中", "closed": "已办结", "returned": "退回"}
FINAL = frozenset({"closed", "returned"})
#: Each status's place in the case's flow: of two statuses stamped at the same time, the later in the flow stands.
FLOW_RANK = {"accepted": 0, "dispatched": 1, "handling": 2, "closed": 3, "returned": 3}
URGENCIES = {"urgent": "特急", "high": "紧急", "normal": "一般"}

SIG_HEADER = "X-Grid-Signature"
TS_HEADER = "X-Grid-Timestamp"
KEY_HEADER = "X-Grid-Key-Id"
SIG_PREFIX = "hmac-sha256="

Text = Annotated[str, msgspec.Meta(max_length=2000)]
Short = Annotated[str, msgspec.Meta(max_length=200)]
Code = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z_.-]{1,32}$")]
Number = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z_.-]{6,80}$")]


class _Struct(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False, kw_only=True):
    pass


class Category(_Struct, kw_only=True):
    code: Code
    name: Short


class Place(_Struct, kw_only=True):
    address: Short
    grid_code: Code
    site: Short
    building: Short = ""
    unit: Short = ""
    house: Short = ""
    zone: Short = ""
    lat: Annotated[float, msgspec.Meta(ge=-90, le=90)] | None = None
    lon: Annotated[float, msgspec.Meta(ge=-180, le=180)] | None = None
    crs: Literal["CGCS2000", "WGS84", "GCJ02"] | None = None


class Reporter(_Struct, kw_only=True):
    type: Literal["resident", "device", "guard"]
    name: Short = ""  # residents reporting from a door plate are anonymous
    org: Short  # the estate's property office, which answers for the report
    org_phone: Short = ""


class Attachment(_Struct, kw_only=True):
    name: Short
    mime: Literal["image/jpeg", "image/png", "image/webp"]
    size: Annotated[int, msgspec.Meta(ge=1, le=16 * 1024 * 1024)]
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    data: str  # base64


class Step(_Struct, kw_only=True):
    stage: Stage
    action: Code
    at: datetime
    by: Short
    note: Text = ""


class Handling(_Struct, kw_only=True):
    state: Code  # the estate's own workflow state (new, acknowledged, dispatched, on_scene, resolved, closed)
    state_name: Short
    closed: bool
    cause: Code | None = None  # real, false, test, device_fault, unknown (once resolved)
    flags: list[Literal["damage", "police"]] = []
    steps: Annotated[list[Step], msgspec.Meta(max_length=500)] = []


class Event(_Struct, kw_only=True):
    """One grid event (a report, or an update of one already reported: the same number, a higher revision)."""

    schema: Literal["gatehouse.grid.event"]
    v: Literal[1]
    number: Number
    revision: Annotated[int, msgspec.Meta(ge=1)]
    kind: Literal["report", "update"]
    title: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    category: Category
    subcategory: Category
    source: Literal["物联网感知", "居民上报", "保安上报"]
    source_code: Literal["iot", "resident", "guard"]
    place: Place
    found_at: datetime
    reporter: Reporter
    description: Text
    attachments: Annotated[list[Attachment], msgspec.Meta(max_length=9)] = []
    urgency: Literal["urgent", "high", "normal"]
    estate: Handling
    revised_at: datetime  # when the estate wrote this revision


class Answer(_Struct, kw_only=True):
    """The platform's answer to an accepted record (HTTP 200 or 201)."""

    number: Number
    revision: Annotated[int, msgspec.Meta(ge=1)]
    case_id: Short = ""  # the platform's own case number
    duplicate: bool = False


class Status(_Struct, kw_only=True):
    """A status callback (or one entry of a poll's history) from the platform."""

    schema: Literal["gatehouse.grid.status"]
    v: Literal[1]
    callback_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z_.:-]{1,100}$")]
    number: Number
    case_id: Short = ""
    status: Literal["accepted", "dispatched", "handling", "closed", "returned"]
    at: datetime
    by: Short = ""
    note: Text = ""


class History(_Struct, kw_only=True):
    """The answer to a poll (``GET <url>/events/<number>``)."""

    number: Number
    case_id: Short = ""
    history: Annotated[list[Status], msgspec.Meta(max_length=100)] = []


_event_decoder = msgspec.json.Decoder(Event)
_answer_decoder = msgspec.json.Decoder(Answer)
_status_decoder = msgspec.json.Decoder(Status)
_history_decoder = msgspec.json.Decoder(History)
_encoder = msgspec.json.Encoder()


class ContractError(ValueError):
    """A body that does not follow the contract; the text says where."""


def encode(obj: msgspec.Struct) -> bytes:
    return _encoder.encode(obj)


def _decode(decoder: msgspec.json.Decoder, raw: bytes) -> object:
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise ContractError(str(e)) from None
    except msgspec.DecodeError as e:
        raise ContractError(f"malformed JSON: {e}") from None


def decode_event(raw: bytes) -> Event:
    out = _decode(_event_decoder, raw)
    assert isinstance(out, Event)
    return out


def decode_answer(raw: bytes) -> Answer:
    out = _decode(_answer_decoder, raw)
    assert isinstance(out, Answer)
    return out


def decode_status(raw: bytes) -> Status:
    out = _decode(_status_decoder, raw)
    assert isinstance(out, Status)
    return out


def decode_history(raw: bytes) -> History:
    out = _decode(_history_decoder, raw)
    assert isinstance(out, History)
    return out


def signed_text(timestamp: str, method: str, path: str, body: bytes) -> bytes:
    return f"{timestamp}\n{method.upper()}\n{path}\n".encode() + body


def sign(key: bytes, timestamp: str, method: str, path: str, body: bytes) -> str:
    """The value of ``X-Grid-Signature``."""
    return SIG_PREFIX + hmac.new(key, signed_text(timestamp, method, path, body), hashlib.sha256).hexdigest()


def verify(key: bytes, timestamp: str, method: str, path: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(key, timestamp, method, path, body).encode(), signature.encode())


def headers(key: bytes, key_id: str, timestamp: int, method: str, path: str, body: bytes) -> dict[str, str]:
    ts = str(timestamp)
    return {KEY_HEADER: key_id, TS_HEADER: ts, SIG_HEADER: sign(key, ts, method, path, body)}
