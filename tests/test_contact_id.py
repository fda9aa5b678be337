"""Contact ID codec: byte tables from the public documents, stream behaviour, and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.contact_id import (
    DC4,
    PANEL_MAX_LINE,
    RECEIVER_MAX_LINE,
    CidFramer,
    ContactIdError,
    Heartbeat,
    PanelMessage,
    ReceiverMessage,
    Rejected,
    checksum_char,
    checksum_ok,
    decode_panel,
    decode_receiver,
    encode_heartbeat,
    encode_panel,
    encode_receiver,
    parse_panel,
)

# ---------------------------------------------------------------- panel messages

# Each vector's checksum was worked by hand: the digit values (0 counts 10) and their sum.
PANEL_VECTORS = [
    # 1 2 3 4 1 8 1 1 3 1 10 1 10 1 5 = 52, +8 = 60. The usual DC-05 style example message.
    (b"1234181131010158", PanelMessage("1234", 18, "new", 131, 1, 15)),
    # 1 2 3 4 1 8 1 1 3 10 10 1 10 1 4 = 60 already: the check digit is F (15), never 0.
    (b"123418113001014F", PanelMessage("1234", 18, "new", 130, 1, 14)),
    # ... 1 9 = 65, +10 = 75: a check value of ten is written 0.
    (b"1234181130010190", PanelMessage("1234", 18, "new", 130, 1, 19)),
    # the same message with every zero in its DTMF spelling A
    (b"123418113A01A19A", PanelMessage("1234", 18, "new", 130, 1, 19)),
    # 11 12 13 14 9 8 1 6 10 1 10 10 10 10 10 = 135 = 9 x 15: hex account, type 98, F again
    (b"BCDE98160100000F", PanelMessage("BCDE", 98, "new", 601, 0, 0)),
    # 9 8 7 6 1 8 3 4 10 1 10 1 10 10 3 = 91, +14 (E) = 105: a restore (closing) by user 3
    (b"987618340101003E", PanelMessage("9876", 18, "restore", 401, 1, 3)),
    # 1 2 3 4 1 8 1 6 10 2 10 10 10 10 10 = 88, +2 = 90: periodic test
    (b"1234181602000002", PanelMessage("1234", 18, "new", 602, 0, 0)),
    # 1 2 3 4 1 8 6 1 3 10 10 1 10 1 9 = 70, +5 = 75: qualifier 6, status (previously reported)
    (b"1234186130010195", PanelMessage("1234", 18, "status", 130, 1, 19)),
]


@pytest.mark.parametrize(("wire", "msg"), PANEL_VECTORS)
def test_panel_vectors(wire: bytes, msg: PanelMessage) -> None:
    assert parse_panel(wire) == msg
    assert checksum_ok(wire.decode())
    consumed, item = decode_panel(wire + b"\r\n")
    assert (consumed, item) == (17, msg)  # the LF is skipped by the next call
    if b"A" not in wire:
        assert encode_panel(msg) == wire + b"\r\n"
        assert checksum_char(wire[:15].decode()) == chr(wire[15])


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"1234181131010157", "checksum"),  # last digit off by one
        (b"1234181131010150", "checksum"),  # 0 counts 10, not 0: 52 + 10 = 62
        (b"2234181131010158", "checksum"),  # one account digit changed
        (b"123418113101015", "malformed"),  # 15 digits
        (b"12341811310101588", "malformed"),  # 17 digits
        (b"1234 18 1 131 01 015 8", "malformed"),  # spaces are for documents, not the wire
        (b"1234181131010l58", "malformed"),  # a letter l
        (b"1234181131010b58", "malformed"),  # lower-case hex
        (b"12341811310\xff0158", "malformed"),
        (b"1234171131010159", "unsupported"),  # message type 17 (checksum right: 60)
        (b"1234182131010157", "unsupported"),  # qualifier 2 (checksum right: 60)
        (b"123418113B01015D", "unsupported"),  # hex digit in the event code (checksum right: 75)
    ],
)
def test_panel_rejections(line: bytes, reason: str) -> None:
    item = parse_panel(line)
    assert isinstance(item, Rejected), item
    assert item.reason == reason
    assert item.nbytes == len(line)


def test_decode_panel_stream_cases() -> None:
    good = b"1234181131010158"
    # partial frame: nothing yet, nothing consumed
    assert decode_panel(good[:10]) == (0, None)
    assert decode_panel(good) == (0, None)
    # leading empty lines are skipped and consumed
    assert decode_panel(b"\r\n\r\n") == (4, None)
    # CR alone, LF alone, CR LF
    assert decode_panel(good + b"\r")[0] == 17
    assert decode_panel(good + b"\n")[0] == 17
    # two frames in one read
    two = good + b"\r\n" + b"1234181602000002\r\n"
    n1, m1 = decode_panel(two)
    n2, m2 = decode_panel(two, n1)
    assert isinstance(m1, PanelMessage) and isinstance(m2, PanelMessage)
    assert (m1.code, m2.code) == (131, 602)
    assert n1 + n2 + 1 == len(two)  # the LF after the second CR is left for the next call
    # an over-long line is consumed up to its terminator when it is there
    junk = b"x" * (PANEL_MAX_LINE + 5)
    n, item = decode_panel(junk + b"\r\n" + good + b"\r\n")
    assert isinstance(item, Rejected) and item.reason == "overlong" and n == len(junk) + 1
    # ... and to the end of the buffer when it is not
    n, item = decode_panel(junk)
    assert isinstance(item, Rejected) and item.reason == "overlong" and n == len(junk)
    # a line of exactly the maximum length still waits for its terminator
    assert decode_panel(b"y" * PANEL_MAX_LINE) == (0, None)


def test_encode_panel_refuses_what_it_cannot_send() -> None:
    with pytest.raises(ContactIdError):
        encode_panel(PanelMessage("12G4", 18, "new", 130, 1, 1))
    with pytest.raises(ContactIdError):
        encode_panel(PanelMessage("1234", 18, "new", 130, 1, 1000))
    with pytest.raises(ContactIdError):
        encode_panel(PanelMessage("1234", 17, "new", 130, 1, 1))
    with pytest.raises(ContactIdError):
        checksum_char("12341811310101")


# ---------------------------------------------------------------- receiver lines


RECEIVER_VECTORS = [
    # The Sur-Gard manual's own example: account 1234, duress (121), group 01, zone 001,
    # receiver 01, line 1.
    (b"5011 181234E12101001" + DC4, ReceiverMessage("01", "1", "1234", "new", 121, 1, 1)),
    (b"5023 18BC12R13002015" + DC4, ReceiverMessage("02", "3", "BC12", "restore", 130, 2, 15)),
    (b"501A 180042P40101007" + DC4, ReceiverMessage("01", "A", "0042", "status", 401, 1, 7)),
    # the supervisory heartbeat: 1011, eleven spaces, @, four spaces
    (b"1011           @    " + DC4, Heartbeat("01", "1")),
]


@pytest.mark.parametrize(("wire", "item"), RECEIVER_VECTORS)
def test_receiver_vectors(wire: bytes, item: ReceiverMessage | Heartbeat) -> None:
    assert decode_receiver(wire) == (len(wire), item)
    if isinstance(item, ReceiverMessage):
        assert encode_receiver(item) == wire
    else:
        assert encode_heartbeat(item.receiver, item.line) == wire


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"5011 181234X12101001", "unsupported"),  # qualifier X
        (b"5011 181234E1B1A1001", "unsupported"),  # hex in the event code
        (b"1011          @    ", "unsupported"),  # heartbeat with ten spaces
        (b"3011    123456BA0001", "unsupported"),  # another Sur-Gard protocol (SIA), well formed
        (b"5011 18\x071234E12101001", "malformed"),  # a control byte inside
        (b"501", "malformed"),
        (b"\xfe\xff5011 181234E12101001", "malformed"),
    ],
)
def test_receiver_rejections(line: bytes, reason: str) -> None:
    consumed, item = decode_receiver(line + DC4)
    assert consumed == len(line) + 1
    assert isinstance(item, Rejected) and item.reason == reason


def test_receiver_stream_cases() -> None:
    msg = b"5011 181234E12101001"
    assert decode_receiver(msg) == (0, None)  # no DC4 yet
    # CR LF around lines (some receivers add them) are skipped
    n, item = decode_receiver(b"\r\n" + msg + b"\r\n" + DC4)
    assert isinstance(item, ReceiverMessage) and n == len(msg) + 5
    junk = b"z" * (RECEIVER_MAX_LINE + 1)
    n, item = decode_receiver(junk)
    assert isinstance(item, Rejected) and item.reason == "overlong" and n == len(junk)


# ---------------------------------------------------------------- framer


def test_framer_byte_by_byte_and_two_in_one() -> None:
    f = CidFramer("panel")
    stream = b"1234181131010158\r\n1234181602000002\r\n"
    out = [item for b in stream for item in f.feed(bytes([b]))]
    assert [m.code for m in out if isinstance(m, PanelMessage)] == [131, 602]
    assert f.feed(stream) == out
    assert f.garbage_bytes == 0


def test_framer_overlong_is_counted_once_and_resynchronises() -> None:
    f = CidFramer("panel")
    out = f.feed(b"\x00" * 100)
    assert [r.reason for r in out if isinstance(r, Rejected)] == ["overlong"]
    assert f.feed(b"\x01" * 1000) == []  # still the same over-long line
    out = f.feed(b"tail\r1234181131010158\r\n")
    assert out == [PanelMessage("1234", 18, "new", 131, 1, 15)]
    assert f.garbage_bytes == 1104


def test_framer_rejects_are_counted_in_garbage_bytes() -> None:
    f = CidFramer("receiver")
    out = f.feed(b"\x07\x07" + DC4 + b"5011 181234E12101001" + DC4 + b"3011    123456BA0001" + DC4)
    assert [type(x).__name__ for x in out] == ["Rejected", "ReceiverMessage", "Rejected"]
    assert f.garbage_bytes == 2  # the well-formed unsupported line is not garbage


def test_framer_mode_is_checked() -> None:
    with pytest.raises(ValueError):
        CidFramer("modem")  # type: ignore[arg-type]


# ---------------------------------------------------------------- fuzz

DIGITS = "0123456789ABCDEF"


def _weight(c: str) -> int:
    v = DIGITS.index(c)
    return 10 if v == 0 else v


panel_messages = st.builds(
    PanelMessage,
    account=st.text("0123456789BCDEF", min_size=4, max_size=4),
    message_type=st.sampled_from([18, 98]),
    qualifier=st.sampled_from(["new", "restore", "status"]),
    code=st.integers(0, 999),
    partition=st.integers(0, 99),
    zone=st.integers(0, 999),
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 300))
def test_decoders_never_raise(data: bytes, start: int) -> None:
    start = min(start, len(data))
    for decode, limit in ((decode_panel, PANEL_MAX_LINE), (decode_receiver, RECEIVER_MAX_LINE)):
        consumed, item = decode(data, start)
        assert 0 <= consumed <= len(data) - start
        if item is None:
            assert len(data) - start - consumed <= limit
        else:
            assert consumed > 0


@settings(max_examples=300, deadline=None)
@given(st.text(DIGITS, min_size=16, max_size=16))
def test_panel_accepts_exactly_the_right_checksums(digits: str) -> None:
    item = parse_panel(digits.encode())
    right = sum(_weight(c) for c in digits) % 15 == 0
    if not right:
        assert isinstance(item, Rejected) and item.reason == "checksum"
    else:
        assert not (isinstance(item, Rejected) and item.reason == "checksum")


@settings(max_examples=300, deadline=None)
@given(panel_messages, st.integers(0, 15), st.sampled_from(DIGITS))
def test_a_corrupted_digit_never_yields_a_message(msg: PanelMessage, pos: int, new: str) -> None:
    wire = encode_panel(msg, b"")
    old = chr(wire[pos])
    corrupted = wire[:pos] + new.encode() + wire[pos + 1 :]
    item = parse_panel(corrupted)
    if _weight(new) == _weight(old):
        assert item == msg  # 0 and A are the same digit
    else:
        assert isinstance(item, Rejected) and item.reason == "checksum"


@settings(max_examples=200, deadline=None)
@given(panel_messages)
def test_panel_round_trip(msg: PanelMessage) -> None:
    assert decode_panel(encode_panel(msg)) == (17, msg)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), panel_messages, st.lists(st.integers(1, 50), max_size=20))
def test_panel_stream_resynchronises(garbage: bytes, msg: PanelMessage, cuts: list[int]) -> None:
    stream = garbage + b"\r\n" + encode_panel(msg)
    f = CidFramer("panel")
    out = []
    pos = 0
    for cut in cuts:
        out += f.feed(stream[pos : pos + cut])
        pos += cut
    out += f.feed(stream[pos:])
    assert out[-1] == msg
    for item in out[:-1]:  # a rejected line never becomes a message
        assert isinstance(item, PanelMessage | Rejected)
    # chunking changes nothing: same items (by kind), same garbage count
    g = CidFramer("panel")
    whole = g.feed(stream)
    kinds = [(type(x).__name__, getattr(x, "reason", None)) for x in whole]
    assert kinds == [(type(x).__name__, getattr(x, "reason", None)) for x in out]
    assert g.garbage_bytes == f.garbage_bytes


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(1, 60), max_size=20))
def test_receiver_stream_resynchronises(garbage: bytes, cuts: list[int]) -> None:
    line = b"5011 181234E12101001" + DC4
    stream = garbage + DC4 + line + encode_heartbeat()
    f = CidFramer("receiver")
    out = []
    pos = 0
    for cut in cuts:
        out += f.feed(stream[pos : pos + cut])
        pos += cut
    out += f.feed(stream[pos:])
    assert out[-2:] == [ReceiverMessage("01", "1", "1234", "new", 121, 1, 1), Heartbeat("01", "1")]
