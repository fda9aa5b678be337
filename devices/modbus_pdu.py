"""Modbus PDUs and the MBAP header as bytes, sans-IO: a request is built once and sent as it is, a reply is
checked and decoded from its bytes (and only when it differs from the previous one: see
:class:`devices.modbus_plan.Block`). No objects per transaction, no socket in sight.

A PDU here is the function code and its data (``bytes``); an exception reply has the function code's top
bit set and one byte of exception code. References: Modbus Application Protocol V1.1b3 (function codes 01-06
and 16, exception replies) and Modbus Messaging on TCP/IP V1.0b (the MBAP header).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

READ_FUNCTION = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
BIT_FUNCTIONS = frozenset({1, 2})
MAX_PDU = 253  # bytes, function code included (an RTU frame is at most 256 bytes)
MBAP_LEN = 7  # transaction id, protocol id, length, unit id
_MBAP = struct.Struct(">HHHB")
_HEAD = struct.Struct(">BHH")


class ModbusReplyError(ValueError):
    """A reply that does not answer the request it came for (wrong function, length or echo)."""


def read_request(table: str, address: int, count: int) -> bytes:
    """FC01-04: read ``count`` bits or registers of ``table`` from ``address``."""
    return _HEAD.pack(READ_FUNCTION[table], address, count)


def write_coil_request(address: int, on: bool) -> bytes:
    """FC05 with the standard values: 0xFF00 on, 0x0000 off."""
    return _HEAD.pack(5, address, 0xFF00 if on else 0)


def write_coil_raw_request(address: int, raw: int) -> bytes:
    """FC05 with a vendor's own value field (a timed pulse: duration units, not on/off)."""
    return _HEAD.pack(5, address, raw)


def write_registers_request(address: int, values: Sequence[int]) -> bytes:
    """FC06 for one register, FC16 for several."""
    if len(values) == 1:
        return _HEAD.pack(6, address, values[0])
    n = len(values)
    return _HEAD.pack(16, address, n) + bytes([2 * n]) + struct.pack(f">{n}H", *values)


def exception_code(reply: bytes) -> int | None:
    """The exception code of an exception reply, or None for a normal one."""
    if reply and reply[0] & 0x80:
        return reply[1] if len(reply) > 1 else 0
    return None


def read_values(request: bytes, reply: bytes) -> list[bool] | list[int]:
    """The bits (FC01/02) or registers (FC03/04) a read reply carries, checked against its request."""
    fc, _, count = _HEAD.unpack_from(request)
    if len(reply) < 2 or reply[0] != fc:
        raise ModbusReplyError(f"reply with function {reply[:1].hex() or 'none'} to a function {fc} read")
    size = reply[1]
    if len(reply) != 2 + size:
        raise ModbusReplyError(f"byte count {size} but {len(reply) - 2} data bytes")
    if fc in BIT_FUNCTIONS:
        if size != (count + 7) // 8:
            raise ModbusReplyError(f"{size} bytes for {count} bits")
        bits = int.from_bytes(reply[2:], "little")
        return [bool(bits >> i & 1) for i in range(count)]
    if size != 2 * count:
        raise ModbusReplyError(f"{size} bytes for {count} registers")
    return list(struct.unpack_from(f">{count}H", reply, 2))


def check_write_reply(request: bytes, reply: bytes) -> None:
    """A write's reply echoes its function code and address (and FC16 the register count)."""
    if reply[:3] != request[:3] or (request[0] == 16 and reply[3:5] != request[3:5]) or len(reply) != 5:
        raise ModbusReplyError(f"reply {reply[:8].hex()} does not echo the write {request[:5].hex()}")


# ---------------------------------------------------------------- MBAP (Modbus TCP)


def mbap_frame(tid: int, unit: int, pdu: bytes) -> bytes:
    """The Modbus TCP frame of a PDU: MBAP header (protocol 0, length = unit id + PDU) and the PDU."""
    return _MBAP.pack(tid, 0, len(pdu) + 1, unit) + pdu


def mbap_split(buf: bytes | bytearray, pos: int = 0, end: int | None = None) -> tuple[int, int, int, bytes] | None:
    """The first frame in ``buf[pos:end]``: (bytes it takes, transaction id, unit id, PDU), or None while
    incomplete. Raises :class:`ModbusReplyError` for a header no Modbus TCP peer sends (the stream is lost from
    there)."""
    if end is None:
        end = len(buf)
    if end - pos < MBAP_LEN:
        return None
    tid, proto, length, unit = _MBAP.unpack_from(buf, pos)
    if proto != 0 or not 2 <= length <= MAX_PDU + 1:
        raise ModbusReplyError(f"not a Modbus TCP header: protocol {proto}, length {length}")
    used = 6 + length
    if end - pos < used:
        return None
    return used, tid, unit, bytes(buf[pos + MBAP_LEN : pos + used])


#: Modbus exception codes (Modbus Application Protocol v1.1b3, 7), as a device's refusal is told.
EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


def refusal(code: int) -> str:
    """``refused: Modbus exception 4 (server device failure)``: why a poll read nothing from a device that answered."""
    name = EXCEPTION_NAMES.get(code)
    return f"refused: Modbus exception {code}" + (f" ({name})" if name else "")
