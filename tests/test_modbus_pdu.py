"""Modbus PDUs and MBAP frames as bytes (devices/modbus_pdu.py), from byte tables: the examples of the Modbus
Application Protocol Specification V1.1b3 (section 6) and Modbus Messaging on TCP/IP V1.0b, partial frames, two
frames in one read, replies that do not answer their request."""

from __future__ import annotations

import pytest

from devices.modbus_pdu import (
    ModbusReplyError,
    check_write_reply,
    exception_code,
    mbap_frame,
    mbap_split,
    read_request,
    read_values,
    write_coil_raw_request,
    write_coil_request,
    write_registers_request,
)

H = bytes.fromhex


@pytest.mark.parametrize(
    ("request_pdu", "reply", "values"),
    [
        # 6.1 Read Coils: 19 coils from 20 (0x13); the 3rd byte's unused high bits are zero
        (read_request("coil", 19, 19), H("0103CD6B05"), [bool(int(b)) for b in "1011001111010110101"]),
        # 6.2 Read Discrete Inputs: 22 inputs from 197 (0xC4)
        (read_request("discrete", 196, 22), H("0203ACDB35"), [bool(int(b)) for b in "0011010111011011101011"]),
        # 6.3 Read Holding Registers: 3 registers from 108 (0x6B)
        (read_request("holding", 107, 3), H("0306022B00000064"), [555, 0, 100]),
        # 6.4 Read Input Registers: register 9
        (read_request("input", 8, 1), H("0402000A"), [10]),
    ],
)
def test_reads_from_the_specification(request_pdu: bytes, reply: bytes, values: list[object]) -> None:
    assert read_values(request_pdu, reply) == values


def test_requests_are_the_specification_bytes() -> None:
    assert read_request("coil", 19, 19) == H("0100130013")
    assert read_request("discrete", 196, 22) == H("0200C40016")
    assert read_request("holding", 107, 3) == H("03006B0003")
    assert read_request("input", 8, 1) == H("0400080001")
    assert write_coil_request(172, True) == H("0500ACFF00") and write_coil_request(172, False) == H("0500AC0000")
    assert write_coil_raw_request(0x0201, 5) == H("0502010005")  # a vendor's timed pulse: 5 x 100 ms
    assert write_registers_request(1, [3]) == H("0600010003")
    assert write_registers_request(1, [0x000A, 0x0102]) == H("100001000204000A0102")  # 6.12


@pytest.mark.parametrize(
    ("request_pdu", "reply", "why"),
    [
        (read_request("discrete", 0, 16), H("0102FFFF"), "function"),  # an answer to another function
        (read_request("discrete", 0, 16), H("0201FF"), "bytes for 16 bits"),  # too short for the request
        (read_request("discrete", 0, 16), H("0203FFFF"), "byte count 3"),  # the count lies about the data
        (read_request("holding", 0, 2), H("030400010002FF"), "byte count 4"),
        (read_request("holding", 0, 2), H("03020001"), "for 2 registers"),
        (read_request("holding", 0, 2), b"", "function none"),
    ],
)
def test_a_reply_that_does_not_answer_the_request_is_refused(request_pdu: bytes, reply: bytes, why: str) -> None:
    with pytest.raises(ModbusReplyError, match=why):
        read_values(request_pdu, reply)


def test_write_echoes_and_exceptions() -> None:
    check_write_reply(H("0500ACFF00"), H("0500ACFF00"))
    check_write_reply(H("100001000204000A0102"), H("1000010002"))
    check_write_reply(H("0502010005"), H("0502010005"))
    for request_pdu, reply in (
        (H("0500ACFF00"), H("0500ADFF00")),
        (H("100001000204000A0102"), H("1000010001")),
        (H("0600010003"), H("06000100")),
    ):
        with pytest.raises(ModbusReplyError):
            check_write_reply(request_pdu, reply)
    assert exception_code(H("8202")) == 2 and exception_code(H("8303")) == 3 and exception_code(H("0203ACDB35")) is None


def test_mbap_frames_split_whole_partial_and_back_to_back() -> None:
    frame = mbap_frame(0x0102, 17, H("0203ACDB35"))
    assert frame == H("010200000006110203ACDB35")  # tid, protocol 0, length = unit + PDU, unit, PDU
    assert mbap_split(frame) == (len(frame), 0x0102, 17, H("0203ACDB35"))
    for cut in range(len(frame)):
        assert mbap_split(frame[:cut]) is None  # not complete yet: wait for more
    two = frame + mbap_frame(0x0103, 1, H("8202"))
    used, *_ = mbap_split(two)  # type: ignore[misc]
    assert mbap_split(two[used:]) == (9, 0x0103, 1, H("8202"))


@pytest.mark.parametrize("head", [H("0001000100060102"), H("000100000000" + "01"), H("0001000001000102")])
def test_a_header_no_modbus_peer_sends_is_refused(head: bytes) -> None:
    with pytest.raises(ModbusReplyError, match="not a Modbus TCP header"):
        mbap_split(head + bytes(8))
