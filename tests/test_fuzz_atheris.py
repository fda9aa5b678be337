"""Coverage-guided fuzzing of the byte-level parsers with atheris (libFuzzer), in bounded runs.

Each target of ``tests/atheris_targets.py`` runs in a process of its own (libFuzzer owns its process),
started from a corpus seeded here with valid inputs built by the product's own encoders, for at most
``RUNS`` inputs and ``MAX_TIME_S`` seconds. A target whose property breaks raises, and libFuzzer exits
non-zero with the input saved; the test then fails and names it. libFuzzer's closing lines tell how
many inputs really ran and how many code edges they reached (``cov:``); both are printed for the
closing note and checked, so a harness that silently fuzzes nothing fails too.

The mutant tests run the same harnesses against a parser with its check switched off, to show the
properties have teeth: libFuzzer must find the input that the broken parser lets through.
Inputs that once broke a property are kept below as plain example tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse
from pymodbus.pdu.bit_message import ReadCoilsResponse, ReadDiscreteInputsResponse
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse, ReadInputRegistersResponse

from devices.contact_id import PanelMessage, ReceiverMessage, encode_heartbeat, encode_panel, encode_receiver
from devices.qr_reader import poll_bytes
from gateway import wire
from gateway.wire import passes
from gateway.wire.commands import open_command, sign_command
from portal import config as portal_config
from portal.store import Store as PortalStore
from portal.web.ingest import Ingest
from portal.web.metrics import Metrics
from tests.portal_support import store_key, write_config

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "atheris_targets.py"
#: Inputs and seconds per target; six targets stay well under a minute in all. A deeper hunt on demand:
#: ``ATHERIS_RUNS=2000000 ATHERIS_SECONDS=300 pytest tests/test_fuzz_atheris.py -k bounded``.
RUNS = int(os.environ.get("ATHERIS_RUNS", "60000"))
MAX_TIME_S = int(os.environ.get("ATHERIS_SECONDS", "6"))
UNIT = 7


def stream_input(stream: bytes, cuts: tuple[int, ...] = ()) -> bytes:
    """A stream target's input: one header byte (its low two bits: how many cut offsets follow), the
    offsets, then the stream (see the harness's docstring)."""
    assert len(cuts) <= 3
    return bytes([len(cuts), *cuts]) + stream


def _keys(tmp_path: Path) -> tuple[passes.Ed25519PrivateKey, Path]:
    private, public = passes.generate_keypair()
    path = tmp_path / "fuzz-pub.pem"
    passes.save_public_key(path, public)
    return private, path


def seeds(target: str, private: passes.Ed25519PrivateKey) -> list[bytes]:
    """A few valid inputs per target, made by the product's encoders (pymodbus's for Modbus, which the
    bus engine reads through), with some garbage and two frames in one read."""
    if target == "cid_panel":
        msgs = [
            PanelMessage("1234", 18, "new", 131, 1, 15),
            PanelMessage("BCDE", 98, "restore", 401, 2, 7),
            PanelMessage("0000", 18, "status", 602, 0, 0),
        ]
        frames = [encode_panel(m, t) for m, t in zip(msgs, (b"\r\n", b"\r", b"\n"), strict=True)]
        return [
            stream_input(frames[0]),
            stream_input(b"".join(frames), (5, 17, 40)),
            stream_input(b"12A4181131010158\r\n" + b"\xff" * 40 + b"\n" + frames[1], (3,)),
        ]
    if target == "cid_receiver":
        msg = ReceiverMessage("01", "1", "1234", "new", 121, 1, 1)
        return [
            stream_input(encode_receiver(msg)),
            stream_input(encode_heartbeat() + b"\r\n" + encode_receiver(msg), (9, 30)),
            stream_input(b"5011 18" + b"9" * 150 + b"\x14" + encode_receiver(msg)),
        ]
    if target == "qr_lines":
        return [
            stream_input(b"@3:GH1:ABCDEFGH\r\n"),
            stream_input(b"@17!\n" + poll_bytes(3) + b"hello\r", (4, 6)),
            stream_input(b"\x00bad\r\n" + b"x" * 600 + b"\nok\n", (2,)),
        ]
    if target == "passes":
        fields = passes.PassFields(
            kind="visitor",
            site="s1",
            subject="v-1",
            not_before=1_700_000_000,
            not_after=1_700_086_400,
            house="101",
            units=("3/1",),
            doors=("gate-1",),
            uses=3,
        )
        resident = passes.PassFields(
            kind="resident",
            site="s1",
            subject="alice",
            not_before=1_700_000_000,
            not_after=1_700_000_600,
            gates=True,
            schedule="day",
        )
        rl = passes.RevocationList(
            version=7, issued_at=1_700_000_000, site="s1", passes=[b"p" * 12], subjects=["alice"], blocked=["bob"]
        )
        return [
            passes.sign_pass(private, fields).encode(),
            passes.sign_pass(private, resident).encode() + b"\r\n",
            passes.sign_revocations(private, rl).encode(),
            passes.encode_revocation_body(rl),
        ]
    if target == "wire":
        now = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
        cmd = wire.Command(v=2, id="c1", type="unlock", ts=now, expires=now, by="guard", args={"door": "d1"})
        signed = sign_command(private, cmd, site="s1", gateway="gw1")
        ev = [
            wire.Event(
                id=f"01J{n:023d}",
                seq=n,
                ts=now,
                type="zone.alarm",
                device="panel-1",
                place=wire.Place(site="s1", building="3", zone=f"z{n}"),
                point="in1",
                priority=wire.Priority.INTRUSION,
                data={"n": n},
            )
            for n in (1, 2)
        ]
        return [
            bytes([0]) + signed,
            bytes([0]) + wire.encode(msgspec.structs.replace(cmd, v=1)),
            bytes([5]) + wire.encode(msgspec.structs.replace(cmd, site="s1", gateway="gw1")),
            bytes([1]) + wire.encode(wire.Ack(v=1, seqs=[1, 2, 3])),
            bytes([2]) + wire.encode(wire.Status(v=1, state="online", ts=now, version="1.0", fault="disk")),
            bytes([3]) + wire.encode(wire.batch_events("s1", "gw1", ev)),
            bytes([4]) + wire.topic("s1", "gw1", "events").encode(),
        ]
    if target == "modbus_rtu":
        framer = FramerRTU(DecodePDU(False))
        regs = framer.buildFrame(ReadHoldingRegistersResponse(registers=[1, 2, 0xBEEF], dev_id=UNIT))
        inputs = framer.buildFrame(ReadInputRegistersResponse(registers=[7], dev_id=UNIT))
        coils = framer.buildFrame(ReadCoilsResponse(bits=[True, False, True] * 3, dev_id=UNIT))
        discrete = framer.buildFrame(ReadDiscreteInputsResponse(bits=[False, True], dev_id=UNIT))
        refused = framer.buildFrame(ExceptionResponse(3, 2, device_id=UNIT))
        other = framer.buildFrame(ReadHoldingRegistersResponse(registers=[5], dev_id=UNIT + 1))
        return [
            stream_input(regs),
            stream_input(coils, (3,)),
            stream_input(b"\x00\xff" + discrete, (1, 4)),
            stream_input(inputs),
            stream_input(refused),
            stream_input(other + regs, (7,)),
        ]
    raise AssertionError(target)


def run_target(
    target: str, tmp_path: Path, *, runs: int = RUNS, max_time: int = MAX_TIME_S, prelude: str = ""
) -> tuple[int, str]:
    """Run one harness in its own process on a freshly seeded corpus: (exit code, libFuzzer's output).
    ``prelude`` is Python run after the harness is imported and before fuzzing (the mutant tests)."""
    private, pub = _keys(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, s in enumerate(seeds(target, private)):
        (corpus / f"seed-{i}").write_bytes(s)
    flags = [
        f"-runs={runs}",
        f"-max_total_time={max_time}",
        "-timeout=20",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
        str(corpus),
    ]
    if prelude:
        code = (
            f"import runpy, sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"h = runpy.run_path({str(HARNESS)!r}, run_name='harness'); {prelude}; "
            f"h['main']([{str(HARNESS)!r}, {target!r}, *sys.argv[1:]])"
        )
        cmd = [sys.executable, "-c", code, *flags]
    else:
        cmd = [sys.executable, str(HARNESS), target, *flags]
    env = {**os.environ, "GATEHOUSE_FUZZ_PUBKEY": str(pub), "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=max_time + 60,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout + proc.stderr


def final_stats(output: str) -> tuple[int, int, int]:
    """(inputs run, seconds, coverage) from libFuzzer's closing lines."""
    done = re.search(r"^Done (\d+) runs in (\d+) second\(s\)$", output, re.M)
    cov = re.findall(r"^#\d+\s+\w+\s+cov: (\d+) ", output, re.M)
    assert done and cov, output[-3000:]
    return int(done.group(1)), int(done.group(2)), int(cov[-1])


TARGETS = ["cid_panel", "cid_receiver", "qr_lines", "passes", "wire", "modbus_rtu"]


@pytest.mark.parametrize("target", TARGETS)
def test_atheris_target_finds_nothing_in_a_bounded_run(target: str, tmp_path: Path) -> None:
    rc, out = run_target(target, tmp_path)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert rc == 0, f"{target}: libFuzzer exit {rc}, saved {crashes}\n{out[-6000:]}"
    runs, secs, cov = final_stats(out)
    print(f"atheris {target}: {runs} runs in {secs} s, cov {cov}")
    assert runs >= min(RUNS, 2000), f"{target} ran only {runs} inputs"
    assert cov >= 10, f"{target} reached only {cov} edges: the harness exercises nothing"
    assert not crashes


MUTANTS = {
    # The panel checksum no longer checked: a line with one digit changed yields a message.
    "cid_panel": "import devices.contact_id as c; c.digit_sum = lambda s: 15",
    # The pass signature no longer checked: a pass with a changed body verifies.
    "passes": "import gateway.wire.passes as p; p._verify = lambda pre, raw, keys: (raw[:4].hex(), raw[4:-64])",
    # The command signature no longer checked: a command with a changed body or signature is carried out.
    "wire": (
        "import gateway.wire.commands as c; "
        "c.as_public_key = lambda key: type('AnyKey', (), {'verify': lambda self, sig, data: True})()"
    ),
    # The RTU CRC no longer checked: a PDU comes from a frame with a bad CRC.
    "modbus_rtu": "from pymodbus.framer import FramerRTU; FramerRTU.check_CRC = classmethod(lambda cls, d, c: True)",
}


@pytest.mark.parametrize("target", sorted(MUTANTS))
def test_atheris_target_catches_a_parser_with_its_check_switched_off(target: str, tmp_path: Path) -> None:
    rc, out = run_target(target, tmp_path, runs=200_000, max_time=20, prelude=MUTANTS[target])
    assert rc != 0, out[-3000:]
    assert any(p.name.startswith("crash-") for p in tmp_path.iterdir()), "no crashing input saved"
    m = re.search(r"stat::number_of_executed_units: (\d+)", out)
    print(f"atheris mutant {target}: caught after {m.group(1) if m else '?'} runs")


# ================================================================ inputs atheris found (regressions)

#: atheris (wire target): a status whose key is not UTF-8. msgspec raises UnicodeDecodeError, not a DecodeError,
#: for a string that is not UTF-8 (even a key it would skip), and it escaped the wire decoders, past the gateway
#: uplink's and the portal ingest's ``except WireError``.
BAD_UTF8_STATUS = b'{"v":1,"state":"online","ts":"2026-01-02T03:04:05.000006Z","\x97ersion":"1.0","fault":"disk"}'


@pytest.mark.parametrize(
    "payload",
    [
        BAD_UTF8_STATUS,
        b'{"\xff":1}',
        b'{"v":1,"seqs":[1],"\xc3":0}',
        b'{"v":1,"id":"c\x80","type":"unlock","ts":"2026-01-02T03:04:05Z","expires":"2026-01-02T03:04:05Z","by":"g"}',
        b'{"v":1,"site":"s1","gateway":"gw1","events":[{"id":"\xed\xa0\x80"}]}',
    ],
)
def test_wire_decoders_refuse_strings_that_are_not_utf8_as_malformed(payload: bytes) -> None:
    for decode in (wire.decode_status, wire.decode_ack, lambda b: wire.decode_batch(b, site="s1", gateway="gw1")):
        with pytest.raises(wire.WireError) as e:
            decode(payload)
        assert e.value.reason in ("malformed", "schema"), e.value  # schema: a type error seen before the bytes
    # The command decoders look at the version first (a v1 command is refused as unsigned before its fields).
    v2 = payload.replace(b'"v":1', b'"v":2')
    for decode, data, reasons in (
        (wire.decode_command_body, v2, ("malformed", "schema")),
        (lambda b: open_command(b, {}, site="s1", gateway="gw1"), payload, ("malformed", "schema", "unsigned")),
    ):
        with pytest.raises(wire.WireError) as e:
            decode(data)
        assert e.value.reason in reasons, e.value
    with pytest.raises(wire.WireError, match="not UTF-8"):
        wire.decode_status(BAD_UTF8_STATUS)


async def test_portal_ingest_counts_a_payload_that_is_not_utf8(tmp_path: Path) -> None:
    cfg = portal_config.load(write_config(tmp_path / "portal", None))
    store = PortalStore(tmp_path / "p.db", key=store_key(tmp_path / "p.db"))
    await store.start()
    try:
        ingest = Ingest(cfg, store, Metrics())
        await ingest.handle(wire.topic("s1", "gw1", "status"), BAD_UTF8_STATUS)
        await ingest.handle(wire.topic("s1", "gw1", "events"), b'{"v":1,"site":"s1","\xff":"gw1","events":[]}')
        assert ingest.rejections["malformed"] == 2, ingest.rejections
    finally:
        await store.close()


#: atheris (passes target): a revocation-list body (as a gateway keeps it in its store) with a msgpack str that is
#: not UTF-8 (``a2 ff ff``) escaped decode_revocation_body as UnicodeDecodeError.
BAD_UTF8_RL_BODY = bytes.fromhex("9607ce6553f100a2ffff73707091a3") + b"\xbc" * 4 + b"\xa5alice\x91\xa3bob"


def test_revocation_body_with_a_string_that_is_not_utf8_is_malformed() -> None:
    with pytest.raises(passes.PassError) as e:
        passes.decode_revocation_body(BAD_UTF8_RL_BODY)
    assert e.value.reason == "malformed"


def test_a_signed_pass_body_with_a_string_that_is_not_utf8_is_malformed_not_a_crash() -> None:
    """A body signed by a trusted key yet holding a non-UTF-8 site (a portal bug) is refused with PassError."""
    private, public = passes.generate_keypair()
    good = msgspec.msgpack.decode(
        passes.encode_body(
            passes.PassFields(
                kind="visitor", site="s1", subject="v-1", not_before=1_700_000_000, not_after=1_700_000_600
            )
        )
    )
    body = msgspec.msgpack.encode(good).replace(b"\xa2s1", b"\xa2s\xff")
    signed = bytes.fromhex(passes.key_id(public)) + body
    text = passes.PASS_PREFIX + passes._b32encode(signed + private.sign(passes.PASS_PREFIX.encode() + signed))
    with pytest.raises(passes.PassError) as e:
        passes.parse_pass(text, passes.keyring([public]))
    assert e.value.reason == "malformed" and "signed body invalid" in e.value.detail
