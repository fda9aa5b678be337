"""Ademco Contact ID on a serial line, sans-IO: bytes in, (bytes consumed, frame) out, and back.

Two framings, both described with their sources in ``docs/contact-id.md``:

* **panel** — the panel's own 16-digit message ``ACCT MT Q XYZ GG CCC S`` as ASCII hex digits,
  one message per line, ended by CR, LF or CR LF (the encoder writes CR LF). ``A`` is accepted
  as a spelling of ``0`` (its DTMF digit); in the checksum ``0`` counts 10.
* **receiver** — a Sur-Gard style automation port: ``5RRL 18AAAAQXYZGGCCC`` and the heartbeat
  ``1011`` + 11 spaces + ``@`` + 4 spaces, each ended by DC4 (0x14).

``decode_panel`` / ``decode_receiver`` are pure: they look at ``data[start:]`` and return how many
bytes they consumed and what they found (a message, a :class:`Rejected`, or ``None`` when more
bytes are needed). :class:`CidFramer` wraps them with the one piece of state a stream needs:
after an over-long line it drops bytes up to the next terminator, so a run of garbage is counted
once and the stream resynchronises at the next terminator.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

ACK = b"\x06"
NAK = b"\x15"
DC4 = b"\x14"

PANEL_MAX_LINE = 32  # a panel line is 16 characters; anything past twice that is garbage
RECEIVER_MAX_LINE = 128  # other Sur-Gard protocols are longer than Contact ID lines, none this long

Qualifier = Literal["new", "restore", "status"]
RejectReason = Literal["checksum", "malformed", "overlong", "unsupported"]

QUALIFIER_DIGITS: dict[str, Qualifier] = {"1": "new", "3": "restore", "6": "status"}
QUALIFIER_LETTERS: dict[str, Qualifier] = {"E": "new", "R": "restore", "P": "status"}
_DIGIT_OF: dict[Qualifier, str] = {v: k for k, v in QUALIFIER_DIGITS.items()}
_LETTER_OF: dict[Qualifier, str] = {v: k for k, v in QUALIFIER_LETTERS.items()}

#: The value of each character in the checksum sum: 0 (and its DTMF spelling A) counts 10.
DIGIT_VALUES: dict[str, int] = (
    {str(d): d for d in range(1, 10)} | {"0": 10, "A": 10} | {c: 11 + i for i, c in enumerate("BCDEF")}
)
_CHECK_CHAR = {v: c for c, v in DIGIT_VALUES.items() if c != "A"}  # 10 -> "0", 15 -> "F"

_HEARTBEAT_RE = re.compile(r"1([0-9A-F]{2})([0-9A-Z]) {11}@ {4}")
_RECEIVER_CID_RE = re.compile(r"5([0-9A-F]{2})([0-9A-Z]) 18([0-9A-F]{4})([ERP])([0-9A-F]{3})([0-9A-F]{2})([0-9A-F]{3})")
_ACCOUNT_RE = re.compile(r"[0-9A-F]{4}")


class ContactIdError(ValueError):
    """An argument that cannot be encoded (an account with a bad digit, a zone above 999)."""


@dataclass(frozen=True, slots=True)
class PanelMessage:
    """One 16-digit Contact ID message from a panel, checksum verified. ``account`` is written with
    ``0`` for zero (never ``A``) and may hold B-F."""

    account: str
    message_type: int  # 18 or 98
    qualifier: Qualifier
    code: int
    partition: int
    zone: int


@dataclass(frozen=True, slots=True)
class ReceiverMessage:
    """One Contact ID line from an alarm receiver's automation port (protocol 5)."""

    receiver: str  # RR
    line: str  # L
    account: str
    qualifier: Qualifier
    code: int
    partition: int
    zone: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The receiver's supervisory signal (``@``)."""

    receiver: str
    line: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A line that yields no report. ``unsupported`` lines were received intact (they should be
    acknowledged, resending would not help); ``checksum`` and ``malformed`` ones were not."""

    reason: RejectReason
    nbytes: int
    sample: bytes  # the first bytes, for a log line
    detail: str = ""


PanelItem = PanelMessage | Rejected
ReceiverItem = ReceiverMessage | Heartbeat | Rejected
Item = PanelMessage | ReceiverMessage | Heartbeat | Rejected

_SAMPLE = 40


def _reject(reason: RejectReason, line: bytes, detail: str = "") -> Rejected:
    return Rejected(reason, len(line), bytes(line[:_SAMPLE]), detail)


# ---------------------------------------------------------------- checksum


def digit_sum(digits: str) -> int:
    """Sum of Contact ID digits with 0 (or A) counted as 10. Raises KeyError on a non-digit."""
    return sum(DIGIT_VALUES[c] for c in digits)


def checksum_char(body: str) -> str:
    """The 16th character for a 15-digit body: makes the total a multiple of 15. A checksum of 10
    is written ``0``; when the body alone is already a multiple of 15 it is ``F``."""
    if len(body) != 15:
        raise ContactIdError(f"a Contact ID body has 15 digits, not {len(body)}")
    try:
        rest = digit_sum(body) % 15
    except KeyError as e:
        raise ContactIdError(f"not a Contact ID digit: {e.args[0]!r}") from None
    return _CHECK_CHAR[15 - rest]  # rest 0 -> 15 -> "F"


def checksum_ok(digits: str) -> bool:
    try:
        return digit_sum(digits) % 15 == 0
    except KeyError:
        return False


# ---------------------------------------------------------------- panel framing


def _fields(account: str, code: int, partition: int, zone: int) -> tuple[str, str]:
    if not _ACCOUNT_RE.fullmatch(account):
        raise ContactIdError(f"account must be 4 hex digits, got {account!r}")
    if not (0 <= code <= 999 and 0 <= partition <= 99 and 0 <= zone <= 999):
        raise ContactIdError(f"out of range: code {code}, partition {partition}, zone {zone}")
    return account.replace("A", "0"), f"{code:03d}{partition:02d}{zone:03d}"


def encode_panel(msg: PanelMessage, terminator: bytes = b"\r\n") -> bytes:
    if msg.message_type not in (18, 98):
        raise ContactIdError(f"message type must be 18 or 98, got {msg.message_type}")
    account, rest = _fields(msg.account, msg.code, msg.partition, msg.zone)
    body = f"{account}{msg.message_type}{_DIGIT_OF[msg.qualifier]}{rest}"
    return (body + checksum_char(body)).encode("ascii") + terminator


def _decimal(s: str) -> int | None:
    s = s.replace("A", "0")
    return int(s) if s.isdigit() else None


def parse_panel(line: bytes) -> PanelItem:
    """One line without its terminator."""
    if len(line) != 16:
        return _reject("malformed", line, f"{len(line)} characters, not 16")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return _reject("malformed", line, "not ASCII")
    if any(c not in DIGIT_VALUES for c in text):
        return _reject("malformed", line, "not a Contact ID digit")
    if digit_sum(text) % 15:
        return _reject("checksum", line)
    mt, q = text[4:6].replace("A", "0"), text[6].replace("A", "0")
    code, partition, zone = _decimal(text[7:10]), _decimal(text[10:12]), _decimal(text[12:15])
    if mt not in ("18", "98"):
        return _reject("unsupported", line, f"message type {mt}")
    if q not in QUALIFIER_DIGITS:
        return _reject("unsupported", line, f"qualifier {q}")
    if code is None or partition is None or zone is None:
        return _reject("unsupported", line, "hex digit in event, partition or zone")
    return PanelMessage(text[:4].replace("A", "0"), int(mt), QUALIFIER_DIGITS[q], code, partition, zone)


def _scan(data: bytes, start: int, skip: bytes, terminators: bytes, max_line: int) -> tuple[int, bytes | None, bool]:
    """Find the next line in ``data[start:]``: (consumed, line or None, over-long?). An over-long
    line is consumed up to its terminator if ``data`` holds one, else to the end of ``data``."""
    n = len(data)
    i = start
    while i < n and data[i] in skip:
        i += 1
    end = _find_any(data, terminators, i, min(n, i + max_line + 1))
    if end >= 0:
        return end + 1 - start, data[i:end], False
    if n - i <= max_line:
        return i - start, None, False
    end = _find_any(data, terminators, i + max_line + 1, n)
    if end >= 0:
        return end + 1 - start, data[i:end], True
    return n - start, data[i:n], True


def _find_any(data: bytes, needles: bytes, lo: int, hi: int) -> int:
    found = [j for j in (data.find(t, lo, hi) for t in needles) if j >= 0]
    return min(found) if found else -1


def decode_panel(data: bytes, start: int = 0) -> tuple[int, PanelItem | None]:
    consumed, line, overlong = _scan(data, start, b"\r\n", b"\r\n", PANEL_MAX_LINE)
    if line is None:
        return consumed, None
    if overlong:
        return consumed, _reject("overlong", line)
    return consumed, parse_panel(line)


# ---------------------------------------------------------------- receiver framing


def encode_receiver(msg: ReceiverMessage) -> bytes:
    if not re.fullmatch(r"[0-9A-F]{2}", msg.receiver) or not re.fullmatch(r"[0-9A-Z]", msg.line):
        raise ContactIdError(f"receiver {msg.receiver!r} / line {msg.line!r} not encodable")
    account, rest = _fields(msg.account, msg.code, msg.partition, msg.zone)
    return f"5{msg.receiver}{msg.line} 18{account}{_LETTER_OF[msg.qualifier]}{rest}".encode("ascii") + DC4


def encode_heartbeat(receiver: str = "01", line: str = "1") -> bytes:
    return f"1{receiver}{line}{' ' * 11}@{' ' * 4}".encode("ascii") + DC4


def parse_receiver(line: bytes) -> ReceiverItem:
    """One automation-port line without its DC4."""
    line = line.rstrip(b"\r\n")
    if not line or any(b < 0x20 or b > 0x7E for b in line):
        return _reject("malformed", line, "empty or not printable ASCII")
    text = line.decode("ascii")
    m = _RECEIVER_CID_RE.fullmatch(text)
    if m:
        rr, ln, account, q, code_s, part_s, zone_s = m.groups()
        code, partition, zone = _decimal(code_s), _decimal(part_s), _decimal(zone_s)
        if code is None or partition is None or zone is None:
            return _reject("unsupported", line, "hex digit in event, partition or zone")
        return ReceiverMessage(rr, ln, account, QUALIFIER_LETTERS[q], code, partition, zone)
    m = _HEARTBEAT_RE.fullmatch(text)
    if m:
        return Heartbeat(m.group(1), m.group(2))
    if len(text) < 4:
        return _reject("malformed", line, "too short for a receiver line")
    return _reject("unsupported", line, "not a Contact ID line or heartbeat")


def decode_receiver(data: bytes, start: int = 0) -> tuple[int, ReceiverItem | None]:
    consumed, line, overlong = _scan(data, start, b"\r\n\x14", b"\x14", RECEIVER_MAX_LINE)
    if line is None:
        return consumed, None
    if overlong:
        return consumed, _reject("overlong", line)
    return consumed, parse_receiver(line)


# ---------------------------------------------------------------- stream framer


class CidFramer:
    """Feeds a byte stream through :func:`decode_panel` or :func:`decode_receiver`.

    ``garbage_bytes`` counts every byte dropped: rejected lines and the rest of an over-long run.
    """

    def __init__(self, mode: Literal["panel", "receiver"]) -> None:
        if mode == "panel":
            self._decode: Callable[[bytes, int], tuple[int, Item | None]] = decode_panel
            self._terminators = b"\r\n"
        elif mode == "receiver":
            self._decode = decode_receiver
            self._terminators = DC4
        else:
            raise ValueError(f"mode must be 'panel' or 'receiver', got {mode!r}")
        self.mode = mode
        self._buf = b""
        self._discarding = False
        self.garbage_bytes = 0

    def reset(self) -> None:
        """Forget a partial line (after the port was reopened)."""
        self._buf = b""
        self._discarding = False

    def feed(self, data: bytes) -> list[Item]:
        if self._discarding:
            j = _find_any(data, self._terminators, 0, len(data))
            if j < 0:
                self.garbage_bytes += len(data)
                return []
            self.garbage_bytes += j
            data = data[j + 1 :]
            self._discarding = False
        buf = self._buf + data if self._buf else bytes(data)
        out: list[Item] = []
        pos = 0
        while pos < len(buf):
            consumed, item = self._decode(buf, pos)
            pos += consumed
            if item is None:
                break
            out.append(item)
            if isinstance(item, Rejected) and item.reason != "unsupported":
                self.garbage_bytes += item.nbytes
                if item.reason == "overlong" and buf[pos - 1] not in self._terminators:
                    self._discarding = True  # the rest of this line is still to come: drop it
                    break
        self._buf = buf[pos:]
        return out
