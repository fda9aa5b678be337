"""Coverage-guided atheris harnesses for the byte-level parsers of outside input, the companions of the
hypothesis properties in ``tests/test_fuzz_parsers.py``. Run one target in its own process::

    python tests/atheris_targets.py TARGET [libFuzzer flags] [corpus dirs]
    python tests/atheris_targets.py cid_panel -runs=20000 -max_total_time=5 /tmp/corpus

Each target takes the fuzzer's bytes and asserts, against an oracle written here from the documents
(``docs/contact-id.md``, the Modbus spec, the pass and wire module docstrings), the same three things
as the hypothesis tests: only the parser's documented error escapes, nothing is taken from input that
failed its check, and a good frame after garbage is decoded. A broken property raises, so libFuzzer
stops with the input saved under ``-artifact_prefix``; ``tests/test_fuzz_atheris.py`` runs them all.

Inputs of the stream targets (``cid_panel``, ``cid_receiver``, ``qr_lines``, ``modbus_rtu``) start with
one header byte: its low two bits say how many cut offsets follow (one byte each), where the rest of the
input, the stream, is cut into reads as a port would deliver it. ``wire`` inputs start with a byte
choosing the decoder (:data:`WIRE_KINDS`, modulo). ``passes`` inputs are the scanned text itself. The
pass targets trust the Ed25519 public key in the PEM file named by ``GATEHOUSE_FUZZ_PUBKEY`` (so a test
can seed signed passes); without it they trust a fresh key.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["devices", "gateway", "pymodbus"]):
    import pymodbus.pdu  # noqa: F401  (instrumented: the RTU framer and PDU decoders our bus reads through)
    from pymodbus.exceptions import ModbusException

    from devices.contact_id import (
        DC4,
        PANEL_MAX_LINE,
        RECEIVER_MAX_LINE,
        CidFramer,
        Heartbeat,
        PanelMessage,
        ReceiverMessage,
        Rejected,
    )
    from devices.modbus_link import BusSpec, Link
    from devices.qr_reader import MAX_LINE, Line, LineFramer, Parsed, Refused, parse_line
    from gateway import wire
    from gateway.wire import commands, passes
    from gateway.wire.ed25519 import as_public_key

# ================================================================ shared


def split_input(data: bytes) -> tuple[list[int], bytes]:
    """(cut offsets, stream) from a stream target's input: see the module docstring."""
    if not data:
        return [], b""
    n = data[0] & 3
    return list(data[1 : 1 + n]), data[1 + n :]


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points) if b > a]


# ================================================================ Contact ID (docs/contact-id.md)

# Digit values in the checksum: 0 (and its DTMF spelling A) counts 10, B-F 11-15.
_VALUE = {**{str(d): d for d in range(1, 10)}, "0": 10, "A": 10, "B": 11, "C": 12, "D": 13, "E": 14, "F": 15}
_QUALIFIER_DIGIT = {"1": "new", "3": "restore", "6": "status"}
_QUALIFIER_LETTER = {"E": "new", "R": "restore", "P": "status"}
_RECEIVER_LINE = re.compile(rb"5([0-9A-F]{2})([0-9A-Z]) 18([0-9A-F]{4})([ERP])([0-9A-F]{3})([0-9A-F]{2})([0-9A-F]{3})")
_RECEIVER_HEARTBEAT = re.compile(rb"1([0-9A-F]{2})([0-9A-Z]) {11}@ {4}")


def panel_expected(stream: bytes) -> list[PanelMessage]:
    """Every message the panel framing must yield from ``stream``: each terminated line of exactly 16
    Contact ID digits whose values sum to a multiple of 15, of type 18/98, qualifier 1/3/6 and decimal
    event, partition and zone (A read as 0). An unterminated tail yields nothing yet."""
    out = []
    for seg in re.split(rb"[\r\n]", stream)[:-1]:
        if len(seg) != 16 or not all(chr(b) in _VALUE for b in seg):
            continue
        text = seg.decode("ascii")
        if sum(_VALUE[c] for c in text) % 15:
            continue  # the checksum fails: nothing may come of this line
        z = text.replace("A", "0")
        if z[4:6] not in ("18", "98") or z[6] not in _QUALIFIER_DIGIT or not z[7:15].isdigit():
            continue
        out.append(
            PanelMessage(
                z[:4],
                int(z[4:6]),
                _QUALIFIER_DIGIT[z[6]],
                int(z[7:10]),
                int(z[10:12]),  # type: ignore[arg-type]
                int(z[12:15]),
            )
        )
    return out


def receiver_expected(stream: bytes) -> list[ReceiverMessage | Heartbeat]:
    """Every message and heartbeat the Sur-Gard framing must yield: each DC4-ended line, CR/LF around it
    tolerated, at most 128 bytes, matching protocol 5 (decimal fields, A read as 0) or the heartbeat."""
    out: list[ReceiverMessage | Heartbeat] = []
    for seg in stream.split(DC4)[:-1]:
        seg = seg.lstrip(b"\r\n")
        if len(seg) > RECEIVER_MAX_LINE:
            continue
        seg = seg.rstrip(b"\r\n")
        m = _RECEIVER_LINE.fullmatch(seg)
        if m:
            rr, ln, acct, q, code, part, zone = (g.decode("ascii") for g in m.groups())
            digits = (code + part + zone).replace("A", "0")
            if digits.isdigit():
                out.append(
                    ReceiverMessage(
                        rr,
                        ln,
                        acct,
                        _QUALIFIER_LETTER[q],
                        int(digits[:3]),  # type: ignore[arg-type]
                        int(digits[3:5]),
                        int(digits[5:]),
                    )
                )
            continue
        h = _RECEIVER_HEARTBEAT.fullmatch(seg)
        if h:
            out.append(Heartbeat(h.group(1).decode("ascii"), h.group(2).decode("ascii")))
    return out


def _cid(mode: str, data: bytes, expected: Callable[[bytes], list[Any]], max_line: int) -> None:
    cuts, stream = split_input(data)
    outs = []
    for reads in (chunked(stream, cuts), [stream]):
        framer = CidFramer(mode)  # type: ignore[arg-type]
        items = [item for r in reads for item in framer.feed(r)]  # raises nothing: the framer's contract
        for item in items:
            if isinstance(item, Rejected):
                assert item.reason in ("checksum", "malformed", "overlong", "unsupported"), item
                assert len(item.sample) <= 40
        assert len(framer._buf) <= 2 * max_line + 2, len(framer._buf)  # memory bounded whatever arrived
        outs.append([i for i in items if not isinstance(i, Rejected)])
    want = expected(stream)
    assert outs[0] == want, (stream, outs[0], want)  # exactly the good lines, however the reads were cut
    assert outs[1] == want


def cid_panel(data: bytes) -> None:
    """A panel's serial stream: the framer yields exactly the lines whose checksum holds, and resyncs."""
    _cid("panel", data, panel_expected, PANEL_MAX_LINE)


def cid_receiver(data: bytes) -> None:
    """An alarm receiver's automation port (the line parser of ``devices/cid_receiver.py``)."""
    _cid("receiver", data, receiver_expected, RECEIVER_MAX_LINE)


# ================================================================ QR reader lines (docs/profiles.md)


def qr_lines(data: bytes) -> None:
    """Only printable-ASCII lines of 1..MAX_LINE bytes come out, each exactly a terminated line of the
    stream, however the reads were cut; parse_line takes every one of them without raising."""
    cuts, stream = split_input(data)
    want = [
        Line(s)
        for s in re.split(rb"[\r\n]", stream)[:-1]
        if 0 < len(s) <= MAX_LINE and all(0x20 <= b <= 0x7E for b in s)
    ]
    for reads in (chunked(stream, cuts), [stream]):
        framer = LineFramer()
        items = [item for r in reads for item in framer.feed(r)]
        assert all(
            isinstance(i, Line) or (isinstance(i, Refused) and i.reason in ("overlong", "garbage")) for i in items
        ), items
        lines = [i for i in items if isinstance(i, Line)]
        assert lines == want, (stream, lines, want)
        assert len(framer._buf) <= MAX_LINE
        for line in lines:
            for addressed in (False, True):
                p = parse_line(line.data, addressed)
                assert isinstance(p, Parsed) or p == "unaddressed", p
                if isinstance(p, Parsed):
                    assert p.address is None or (addressed and 0 <= p.address <= 999)
                    assert p.text.encode("ascii") in line.data


# ================================================================ passes (gateway/wire/passes.py)

_PASS_REASONS = {"malformed", "unknown-key", "bad-signature"}
_ring: dict[str, Any] | None = None
_oracle_ring: dict[str, Any] | None = None


def _keyring() -> dict[str, Any]:
    global _ring, _oracle_ring
    if _ring is None:
        path = os.environ.get("GATEHOUSE_FUZZ_PUBKEY")
        key = passes.load_public_key(path) if path else passes.generate_keypair()[1]
        _ring = passes.keyring([key])
        # The oracle's own copy of the key, read with cryptography, not through the product's verifier
        raw = as_public_key(key).raw
        _oracle_ring = {kid: Ed25519PublicKey.from_public_bytes(raw) for kid in _ring}
    return _ring


def _oracle_verify(kid: str, signature: bytes, data: bytes) -> None:
    """Check a signature the product accepted, independently (cryptography raises InvalidSignature: a crash)."""
    _keyring()
    assert _oracle_ring is not None
    _oracle_ring[kid].verify(signature, data)


def _signed_raw(text: str, prefix: str) -> bytes:
    """The signed bytes of an accepted text, decoded here without the product's code, and the signature
    checked here again: an accepted pass or list must carry a good signature over exactly these bytes."""
    body = text.strip(" \t\r\n")[len(prefix) :]
    if prefix == passes.PASS_PREFIX:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    else:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    _oracle_verify(raw[:4].hex(), raw[-64:], prefix.encode() + raw[:-64])
    return raw


def passes_text(data: bytes) -> None:
    """A scanned pass or a revocation list, as bytes and as text: only PassError (with a documented reason)
    escapes, and whatever is accepted was signed by the trusted key over exactly the fields returned."""
    ring = _keyring()
    for text in (data, data.decode("latin-1")):
        try:
            p = passes.parse_pass(text, ring)
        except passes.PassError as e:
            assert e.reason in _PASS_REASONS, e
        else:
            s = text if isinstance(text, str) else text.decode("ascii")
            raw = _signed_raw(s, passes.PASS_PREFIX)
            fields = passes.PassFields(**{f: getattr(p, f) for f in passes.PassFields.__struct_fields__})
            assert raw[4:-64] == passes.encode_body(fields) and raw[:4].hex() == p.kid
        try:
            rl = passes.parse_revocations(text, ring)
        except passes.PassError as e:
            assert e.reason in _PASS_REASONS, e
        else:
            s = text if isinstance(text, str) else text.decode("ascii")
            assert _signed_raw(s, passes.REVOCATION_PREFIX)[4:-64] == passes.encode_revocation_body(rl)
    # A list body as kept in a gateway's store (verified when it arrived): decoded or PassError.
    try:
        passes.decode_revocation_body(data)
    except passes.PassError as e:
        assert e.reason == "malformed", e


# ================================================================ MQTT payloads (gateway/wire)

WIRE_KINDS = ("cmd", "ack", "status", "events", "topic", "cmd-body")
_WIRE_REASONS = {
    "malformed",
    "schema",
    "bad-version",
    "too-large",
    "topic-mismatch",
    "bad-topic",
    "bad-name",
    "unsigned",
    "unknown-key",
    "bad-signature",
    "wrong-gateway",
    "too-long",
}
_SITE, _GW = "s1", "gw1"


def wire_payload(data: bytes) -> None:
    """One MQTT payload (or topic) through the receiving side's decoder: WireError with a documented reason,
    or a message that obeys the contract's own rules and survives encode → decode unchanged."""
    if not data:
        return
    kind, payload = WIRE_KINDS[data[0] % len(WIRE_KINDS)], data[1:]
    try:
        if kind == "topic":
            site, gw, _suffix = wire.parse_topic(payload.decode("utf-8", "surrogateescape"))
            assert wire.NAME_RE.match(site) and wire.NAME_RE.match(gw)
            return
        msg: Any
        if kind == "cmd":
            msg = commands.open_command(payload, _keyring(), site=_SITE, gateway=_GW)
            _check_command_signature(payload, msg)
            again: Any = wire.decode_command_body(wire.encode(msg))
        elif kind == "cmd-body":  # what a signed envelope carries, decoded as the gateway does once it verified
            msg = wire.decode_command_body(payload)
            assert msg.ts.tzinfo is not None and msg.expires.tzinfo is not None and msg.v == wire.COMMAND_VERSION
            again = wire.decode_command_body(wire.encode(msg))
        elif kind == "ack":
            msg = wire.decode_ack(payload)
            assert all(s > 0 for s in msg.seqs)
            again = wire.decode_ack(wire.encode(msg))
        elif kind == "status":
            msg = wire.decode_status(payload)
            again = wire.decode_status(wire.encode(msg))
        else:
            msg = wire.decode_batch(payload, site=_SITE, gateway=_GW)
            assert (msg.site, msg.gateway) == (_SITE, _GW) and 1 <= len(msg.events) <= wire.MAX_BATCH
            seqs = [e.seq for e in msg.events]
            assert seqs == sorted(set(seqs)) and seqs[0] > 0
            assert all(
                e.place.site == _SITE and e.ts.utcoffset() is not None and not e.ts.utcoffset() for e in msg.events
            )
            again = wire.decode_batch(wire.encode(msg), site=_SITE, gateway=_GW)
    except wire.WireError as e:
        assert e.reason in _WIRE_REASONS, e
        return
    assert again == msg, (msg, again)


def _check_command_signature(payload: bytes, msg: wire.Command) -> None:
    """An accepted command: its envelope, read here with the json module, carries a good signature over exactly
    the body it was decoded from, and that body names this gateway and a life within the contract."""
    env = json.loads(payload)
    body, sig = base64.b64decode(env["body"], validate=True), base64.b64decode(env["sig"], validate=True)
    _oracle_verify(env["kid"], sig, b"GC2:" + bytes.fromhex(env["kid"]) + body)
    assert wire.decode_command_body(body) == msg
    assert (msg.site, msg.gateway) == (_SITE, _GW) and msg.v == wire.COMMAND_VERSION
    assert (msg.expires - msg.ts).total_seconds() <= wire.MAX_COMMAND_LIFE_S


# ================================================================ Modbus RTU (devices/modbus_link.py's client)

UNIT = 7
MODBUS_MAX_STREAM = 256  # the span oracle below is quadratic; an answer to our reads is at most 255 bytes


def _crc_table() -> list[int]:
    table = []
    for b in range(256):
        crc = b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC = _crc_table()


def crc_valid_spans(data: bytes) -> set[tuple[int, bytes]]:
    """(unit, PDU bytes) of every span ``data[i:j]`` whose Modbus CRC-16 (poly 0xA001, init 0xFFFF, low byte
    first) checks: the only places a PDU may be taken from."""
    out = set()
    for i in range(len(data)):
        crc = 0xFFFF
        for j in range(i, len(data) - 2):
            crc = (crc >> 8) ^ _CRC[(crc ^ data[j]) & 0xFF]
            if j - i >= 1 and data[j + 1] == crc & 0xFF and data[j + 2] == crc >> 8:
                out.add((data[i], data[i + 1 : j + 1]))
    return out


def _rtu(unit: int, pdu: bytes) -> bytes:
    crc = 0xFFFF
    for b in bytes([unit]) + pdu:
        crc = (crc >> 8) ^ _CRC[(crc ^ b) & 0xFF]
    return bytes([unit]) + pdu + bytes((crc & 0xFF, crc >> 8))


class _RtuProbe:
    """The pymodbus protocol object our bus engine's client reads through (built by the engine's own
    ``Link``), fed byte chunks as its transport would feed them."""

    def __init__(self) -> None:
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        self.loop = asyncio.new_event_loop()
        link = Link(BusSpec("fuzz", "modbus-rtu-over-tcp", host="127.0.0.1", port=1), time.monotonic, 0.0)

        async def make() -> Any:  # pymodbus binds its protocol object to the running loop
            return link._make_client()

        self.ctx = self.loop.run_until_complete(make()).ctx

    def answer(self, reads: list[bytes]) -> tuple[Any, bool]:
        """(the PDU handed to the waiting request or None, whether the link would be closed)."""
        ctx = self.ctx
        ctx.recv_buffer = b""  # what the client does before each request
        ctx.response_future = self.loop.create_future()
        ctx.request_dev_id, ctx.request_transaction_id = UNIT, 0
        for r in reads:
            try:
                ctx.datagram_received(r, None)
            except ModbusException:  # out of data_received: asyncio closes the link, the engine reconnects
                return None, True
        fut = ctx.response_future
        return (fut.result() if fut.done() else None), False


_probe: _RtuProbe | None = None


def modbus_rtu(data: bytes) -> None:
    """An answer on an RTU line: only ModbusException escapes the framer, a PDU comes only from a span
    whose CRC checks and that names our unit, and the next request's clean answer is decoded."""
    global _probe
    if _probe is None:
        _probe = _RtuProbe()
    probe = _probe
    cuts, stream = split_input(data)
    stream = stream[:MODBUS_MAX_STREAM]
    pdu, _closed = probe.answer(chunked(stream, cuts))
    if pdu is not None:
        assert pdu.dev_id == UNIT, pdu
        body = bytes([pdu.function_code]) + pdu.encode()
        if _rtu(UNIT, body) not in stream:  # the re-encoded frame is not there as it stands: look harder
            decoder = probe.ctx.framer.decoder
            found = False
            for unit, span in crc_valid_spans(stream):
                other = decoder.decode(span) if unit == UNIT else None
                if other is not None and type(other) is type(pdu) and other.encode() == pdu.encode():
                    found = True
                    break
            assert found, ("a PDU from no CRC-valid span of our unit", stream.hex(), pdu)
    # Resync: whatever came before, the next request's clean answer is decoded.
    regs = [len(data), sum(data) & 0xFFFF]
    good = _rtu(UNIT, bytes([3, 4]) + b"".join(r.to_bytes(2, "big") for r in regs))
    pdu2, closed2 = probe.answer(chunked(good, cuts))
    assert not closed2 and pdu2 is not None and pdu2.registers == regs, (good.hex(), pdu2)


# ================================================================ entry point

TARGETS: dict[str, Callable[[bytes], None]] = {
    "cid_panel": cid_panel,
    "cid_receiver": cid_receiver,
    "qr_lines": qr_lines,
    "passes": passes_text,
    "wire": wire_payload,
    "modbus_rtu": modbus_rtu,
}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dirs]")
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
