"""The peers' notices on the wire (portal.centre.peers): a body cut into NOTIFY payloads and put together again by
another instance, whatever its characters."""

from __future__ import annotations

import random

from portal.centre.peers import Assembler, encode

#: PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (in the database's encoding, UTF-8)
PAYLOAD_LIMIT = 8000


def test_a_large_body_of_any_characters_arrives_whole_and_each_payload_fits() -> None:
    rng = random.Random(7)
    alphabet = 'ab"\\/é监控中心🚨\n\t\x00{}:,'  # escapes, two-, three- and four-byte characters, NUL, the separator
    events = [
        {
            "id": f"e{i}",
            "type": "test.synthetic",
            "data": {"text": "".join(rng.choices(alphabet, k=rng.randint(0, 90)))},
        }
        for i in range(800)
    ]
    body = {"batches": [{"site": "s", "gateway": "g", "events": events}], "hub": [{"kind": "x", "n": 10**30}]}
    parts = encode("aaaa", 5, body)
    assert len(parts) > 3
    for p in parts:
        assert len(p.encode()) < PAYLOAD_LIMIT
        assert "\x00" not in p  # a NUL cannot go into a payload
    other = Assembler("bbbb")
    got = [other.feed(p) for p in parts]
    assert got[:-1] == [None] * (len(parts) - 1)
    assert got[-1] == body


def test_an_instance_ignores_its_own_notices_and_counts_malformed_ones() -> None:
    asm = Assembler("aaaa")
    assert [asm.feed(p) for p in encode("aaaa", 1, {"hub": []})] == [None]
    assert asm.feed("bbbb:1:0:1:{not json") is None
    assert asm.feed("nonsense") is None
    assert asm.malformed == 2
    assert asm.feed(encode("bbbb", 2, {"hub": [{"kind": "y"}]})[0]) == {"hub": [{"kind": "y"}]}
