"""The signed pass and revocation-list formats (gateway.wire.passes): round trips, forgery, tampering,
junk, key files, and a fuzz of the parser."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.wire import passes as P
from gateway.wire.ed25519 import PublicKey, as_public_key
from gateway.wire.passes import (
    KeyFileError,
    PassError,
    PassFields,
    RevocationList,
    generate_keypair,
    key_id,
    keyring,
    load_private_key,
    load_public_key,
    load_public_keys,
    parse_pass,
    parse_revocations,
    save_private_key,
    save_public_key,
    sign_pass,
    sign_revocations,
)

NOW = 1_780_000_000
PRIV, PUB = generate_keypair()
RING = keyring([PUB])
QR_ALNUM = re.compile(r"^[0-9A-Z $%*+\-./:]+$")


def resident(**kw: object) -> PassFields:
    base: dict[str, object] = dict(
        kind="resident",
        site="lakeside",
        subject="P01J9Z3K",
        house="3-2-501",
        units=("3/2",),
        gates=True,
        not_before=NOW,
        not_after=NOW + 60,
    )
    base.update(kw)
    return PassFields(**base)  # type: ignore[arg-type]


def visitor(**kw: object) -> PassFields:
    base: dict[str, object] = dict(
        kind="visitor",
        site="lakeside",
        subject="V01J9Z3KQ7",
        house="3-2-501",
        units=("3/2",),
        gates=True,
        not_before=NOW,
        not_after=NOW + 2 * 86400,
        uses=4,
    )
    base.update(kw)
    return PassFields(**base)  # type: ignore[arg-type]


def raw_of(text: str) -> bytes:
    body = text[len(P.PASS_PREFIX) :]
    return base64.b32decode(body + "=" * (-len(body) % 8))


def text_of(raw: bytes) -> str:
    return P.PASS_PREFIX + base64.b32encode(raw).decode().rstrip("=")


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "fields", [resident(), visitor(), resident(units=(), doors=("gym",), gates=False, schedule="cleaners", house="")]
)
def test_round_trip_keeps_every_field(fields: PassFields) -> None:
    text = sign_pass(PRIV, fields)
    p = parse_pass(text, RING)
    assert p.kid == key_id(PUB)
    for f in PassFields.__struct_fields__:
        assert getattr(p, f) == getattr(fields, f), f
    assert p.pass_id_hex == fields.pass_id.hex()


def test_text_is_qr_alphanumeric_and_compact() -> None:
    r = sign_pass(PRIV, resident())
    v = sign_pass(PRIV, visitor())
    for t in (r, v):
        assert t.startswith("GH1:")
        assert QR_ALNUM.match(t), t
    # Typical sizes (reported in the hand-over): about 200 characters, a version 8-M QR code.
    assert 180 <= len(r) <= 215, len(r)
    assert 180 <= len(v) <= 225, len(v)


def test_pass_ids_are_random_and_96_bits() -> None:
    ids = {resident().pass_id for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 12 for i in ids)


def test_trailing_newline_from_a_reader_is_tolerated_as_bytes_or_str() -> None:
    text = sign_pass(PRIV, resident())
    assert parse_pass(text + "\r\n", RING).subject == "P01J9Z3K"
    assert parse_pass((text + "\r\n").encode(), RING).subject == "P01J9Z3K"


@pytest.mark.parametrize(
    "bad",
    [
        dict(not_after=NOW),  # no life
        dict(not_after=NOW - 5),
        dict(not_after=NOW + P.MAX_LIFE_S + 1),
        dict(not_before=-1, not_after=60),
        dict(site="bad site"),
        dict(subject=""),
        dict(subject="x" * 65),
        dict(units=("3-2",)),  # a unit reference is building/unit
        dict(units=tuple(f"b/{i}" for i in range(17))),
        dict(uses=0),
        dict(uses=P.MAX_USES + 1),
        dict(kind="guard"),
        dict(pass_id=b"short"),
    ],
)
def test_signing_refuses_fields_a_gateway_would_refuse(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        sign_pass(PRIV, resident(**bad))


# ---------------------------------------------------------------- forgery and tampering


def test_forged_signature_is_refused() -> None:
    """An attacker signs with their own key and puts the estate's key id in front."""
    evil, _ = generate_keypair()
    forged = raw_of(sign_pass(evil, resident()))
    real_kid = bytes.fromhex(key_id(PUB))
    with pytest.raises(PassError) as e:
        parse_pass(text_of(real_kid + forged[4:]), RING)
    assert e.value.reason == "bad-signature"


def test_pass_from_an_unknown_key_is_refused() -> None:
    other, other_pub = generate_keypair()
    text = sign_pass(other, resident())
    with pytest.raises(PassError) as e:
        parse_pass(text, RING)
    assert e.value.reason == "unknown-key"
    assert parse_pass(text, keyring([PUB, other_pub])).kid == key_id(other_pub)  # rotation: both held


def test_every_tampered_byte_is_caught() -> None:
    raw = raw_of(sign_pass(PRIV, visitor()))
    for i in range(len(raw)):
        for flip in (0x01, 0x80):
            bad = bytearray(raw)
            bad[i] ^= flip
            with pytest.raises(PassError) as e:
                parse_pass(text_of(bytes(bad)), RING)
            assert e.value.reason == ("unknown-key" if i < 4 else "bad-signature"), i


def test_truncated_and_extended_passes_are_refused() -> None:
    raw = raw_of(sign_pass(PRIV, resident()))
    for bad in (raw[:-1], raw + b"\x00", raw[:60], raw[4:]):
        with pytest.raises(PassError):
            parse_pass(text_of(bad), RING)


def test_signed_but_invalid_body_is_malformed_not_a_crash() -> None:
    """What a portal bug would produce: a good signature over a body the reader cannot accept."""
    kid = bytes.fromhex(key_id(PUB))
    bodies = (b"\x01", b"\x93\x01", b"\xc1", msgspec.msgpack.encode([1, 2, 3]), msgspec.msgpack.encode({"a": 1}))
    for body in bodies:
        signed = kid + body
        text = text_of(signed + PRIV.sign(P.PASS_PREFIX.encode() + signed))
        with pytest.raises(PassError) as e:
            parse_pass(text, RING)
        assert e.value.reason == "malformed"


def test_a_revocation_list_signature_does_not_make_a_pass() -> None:
    """Domain separation: bytes signed as a list are not accepted as a pass."""
    kid = bytes.fromhex(key_id(PUB))
    body = P.encode_body(resident())
    signed = kid + body
    as_list = PRIV.sign(P.REVOCATION_PREFIX.encode() + signed)
    with pytest.raises(PassError) as e:
        parse_pass(text_of(signed + as_list), RING)
    assert e.value.reason == "bad-signature"


# ---------------------------------------------------------------- junk


JUNK = [
    "",
    "   ",
    "GH1:",
    "GH1:AAAA",
    "GH2:" + sign_pass(PRIV, resident())[4:],
    sign_pass(PRIV, resident()).lower(),
    sign_pass(PRIV, resident()) + "=",
    "https://example.invalid/house/3-2-501",
    "\x00\xff\xfe" * 30,
    "GH1:" + "A" * 500,
    "GH1:" + "1" * 200,  # not in the base32 alphabet
    "GH1:" + "漢字" * 50,
]


@pytest.mark.parametrize("junk", JUNK)
def test_junk_is_malformed(junk: str) -> None:
    with pytest.raises(PassError) as e:
        parse_pass(junk, RING)
    assert e.value.reason in ("malformed", "unknown-key")
    if not junk.startswith("GH1:A"):
        assert e.value.reason == "malformed"


def test_non_canonical_base32_is_refused() -> None:
    """A twin text that decodes to the same bytes (unused low bits of the last character set)."""
    # A pass whose length is not a multiple of 5 bytes leaves unused bits in the last character.
    text = next(t for t in (sign_pass(PRIV, resident(house="1-" * n + "1")) for n in range(5)) if len(raw_of(t)) % 5)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    twin = text[:-1] + alphabet[alphabet.index(text[-1]) ^ 1]
    assert raw_of(twin) == raw_of(text)
    with pytest.raises(PassError) as e:
        parse_pass(twin, RING)
    assert (e.value.reason, e.value.detail) == ("malformed", "not canonical base32")


def test_over_long_input_is_refused_before_decoding_and_fast() -> None:
    for junk in ("A" * 10_000, b"\xff" * 10_000, "GH1:" + "A" * 10_000_000, os.urandom(20_000)):
        t0 = time.thread_time()  # the work done: this thread's CPU time (a loaded machine may preempt it meanwhile)
        with pytest.raises(PassError) as e:
            parse_pass(junk, RING)
        elapsed = time.thread_time() - t0
        assert e.value.reason == "malformed"
        assert "longer than" in e.value.detail  # the length check came first: no decoding was tried
        assert elapsed < 0.005, elapsed


def test_binary_junk_within_the_limit_is_malformed() -> None:
    with pytest.raises(PassError) as e:
        parse_pass(bytes(range(256)), RING)
    assert e.value.reason == "malformed"


# ---------------------------------------------------------------- fuzz


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=600), st.binary(max_size=600)))
def test_fuzz_only_pass_error_escapes(data: str | bytes) -> None:
    try:
        parse_pass(data, RING)
    except PassError as e:
        assert e.reason in ("malformed", "unknown-key", "bad-signature")


GOOD = sign_pass(PRIV, visitor())
GOOD_PASS = parse_pass(GOOD, RING)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_pass_never_yields_other_fields(data: st.DataObject) -> None:
    text = GOOD
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        i = data.draw(st.integers(0, len(text) - 1))
        c = data.draw(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567=:a \n"))
        if op == "replace":
            text = text[:i] + c + text[i + 1 :]
        elif op == "insert":
            text = text[:i] + c + text[i:]
        else:
            text = text[:i] + text[i + 1 :]
    try:
        p = parse_pass(text, RING)
    except PassError as e:
        assert e.reason in ("malformed", "unknown-key", "bad-signature")
        assert GOOD_PASS.subject not in str(e)  # a refused pass yields nothing of its contents
    else:
        assert p == GOOD_PASS  # only a no-op mutation (e.g. surrounding whitespace) may still parse


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=69, max_size=200))
def test_fuzz_random_bytes_under_a_known_kid_fail_the_signature(tail: bytes) -> None:
    kid = bytes.fromhex(key_id(PUB))
    with pytest.raises(PassError) as e:
        parse_pass(text_of(kid + tail), RING)
    assert e.value.reason == "bad-signature"


# ---------------------------------------------------------------- key files


def test_private_key_file_is_0600_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "portal-pass.key"
    save_private_key(path, PRIV)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_private_key(path)
    assert key_id(loaded.public_key()) == key_id(PUB)
    with pytest.raises(FileExistsError):
        save_private_key(path, generate_keypair()[0])
    assert key_id(load_private_key(path).public_key()) == key_id(PUB)  # not overwritten


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    save_private_key(path, PRIV)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(path)


def test_public_key_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pub", tmp_path / "b.pub"
    _, pub2 = generate_keypair()
    save_public_key(a, PUB)
    save_public_key(b, pub2)
    assert key_id(load_public_key(a)) == key_id(PUB)
    assert set(load_public_keys([a, b])) == {key_id(PUB), key_id(pub2)}


def test_a_private_key_is_never_accepted_where_a_public_key_belongs(tmp_path: Path) -> None:
    path = tmp_path / "oops.pem"
    save_private_key(path, PRIV)
    with pytest.raises(KeyFileError, match="private key"):
        load_public_key(path)
    with pytest.raises(TypeError):
        keyring([PRIV])  # type: ignore[list-item]
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path / "missing.pem")


# ---------------------------------------------------------------- the gateway's verifier (libsodium)


def test_the_gateway_verifies_with_libsodium_what_cryptography_signs() -> None:
    """Same keys, same signed bytes: libsodium accepts every signature cryptography makes, and refuses each of
    them with one bit changed, in the message, the signature or the key."""
    rng = random.Random(17)
    for n in range(200):
        priv, pub = generate_keypair()
        data = rng.randbytes(rng.randrange(0, 300))
        sig = priv.sign(data)
        key = as_public_key(pub)
        assert key.raw == pub.public_bytes_raw() and key_id(key) == key_id(pub)
        assert key.verify(sig, data)
        bit = rng.randrange(8 * 64)
        bad_sig = bytearray(sig)
        bad_sig[bit // 8] ^= 1 << bit % 8
        assert not key.verify(bytes(bad_sig), data)
        if data:
            bad_data = bytearray(data)
            bad_data[n % len(data)] ^= 0x40
            assert not key.verify(sig, bytes(bad_data))
        assert not key.verify(sig[:63], data) and not key.verify(sig + b"\0", data)
        assert not as_public_key(generate_keypair()[1]).verify(sig, data)


def test_the_verifier_against_rfc8032_test_vectors() -> None:
    """RFC 8032 section 7.1, tests 1 and 2 (public key, message, signature)."""
    for pk, msg, sig in (
        (
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
            "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
            "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
    ):
        key = PublicKey(bytes.fromhex(pk))
        assert key.verify(bytes.fromhex(sig), bytes.fromhex(msg))
        assert not key.verify(bytes.fromhex(sig), bytes.fromhex(msg) + b"x")


def test_public_key_files_are_the_same_pem_on_both_sides(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = PUB.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "a.pub").write_bytes(pem)
    loaded = load_public_key(tmp_path / "a.pub")
    assert isinstance(loaded, PublicKey) and loaded.raw == PUB.public_bytes_raw()
    assert loaded.to_pem() == pem  # what save_public_key writes is byte for byte what cryptography writes
    save_public_key(tmp_path / "b.pub", loaded)
    back = serialization.load_pem_public_key((tmp_path / "b.pub").read_bytes())
    assert back.public_bytes_raw() == PUB.public_bytes_raw()  # type: ignore[union-attr]
    assert parse_pass(sign_pass(PRIV, resident()), load_public_keys([tmp_path / "b.pub"])).subject == "P01J9Z3K"


def test_public_keys_of_other_kinds_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa, x25519

    others = [
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(),
        ed448.Ed448PrivateKey.generate().public_key(),
        x25519.X25519PrivateKey.generate().public_key(),  # 32 bytes too, but not a signing key
    ]
    for i, other in enumerate(others):
        path = tmp_path / f"{i}.pub"
        path.write_bytes(
            other.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        with pytest.raises(KeyFileError, match="not an Ed25519 public key"):
            load_public_key(path)
    good = PUB.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for bad in (good.replace(b"-----END PUBLIC KEY-----", b""), good[:40] + b"!" + good[41:], good + b"junk"):
        (tmp_path / "bad.pub").write_bytes(bad)
        with pytest.raises(KeyFileError):
            load_public_key(tmp_path / "bad.pub")


DAEMON_PATH = """
import json, sys
from pathlib import Path
from gateway import app, access, commands  # the daemon, its door service and its command guard
from gateway.wire import passes
from gateway.wire.commands import open_command
d = Path(sys.argv[1])
ring = passes.load_public_keys([d / "portal.pub.pem"])
cmd = open_command((d / "cmd.json").read_bytes(), ring, site="lakeside", gateway="gw-1")
p = passes.parse_pass((d / "pass.txt").read_text(), ring)
rl = passes.parse_revocations((d / "rl.txt").read_text(), ring)
print(json.dumps({"cmd": cmd.type, "pass": p.subject, "rl": rl.version,
                  "cryptography": sorted(m for m in sys.modules if m.startswith("cryptography"))[:3]}))
"""


def test_the_daemon_path_never_imports_cryptography(tmp_path: Path) -> None:
    """What a gateway does with keys (load them, open a signed command, read a pass and a revocation list) runs
    without cryptography: importing it costs ~8 MB resident on a Pi."""
    from datetime import timedelta

    from gateway import wire
    from gateway.wire.commands import sign_command

    save_public_key(tmp_path / "portal.pub.pem", PUB)
    now = wire.utcnow()
    cmd = wire.Command(
        v=wire.COMMAND_VERSION,
        id="01J0000000000000000000000A",
        type="arm",
        ts=now,
        expires=now + timedelta(minutes=5),
        by="test",
        args={"group": "fence"},
    )
    (tmp_path / "cmd.json").write_bytes(sign_command(PRIV, cmd, site="lakeside", gateway="gw-1"))
    (tmp_path / "pass.txt").write_text(sign_pass(PRIV, resident()))
    (tmp_path / "rl.txt").write_text(sign_revocations(PRIV, RevocationList(version=3, issued_at=NOW, site="lakeside")))
    out = subprocess.run(
        [sys.executable, "-c", DAEMON_PATH, str(tmp_path)], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == {"cmd": "arm", "pass": "P01J9Z3K", "rl": 3, "cryptography": []}


# ---------------------------------------------------------------- revocation lists


def test_revocation_list_round_trip_and_tamper() -> None:
    rl = RevocationList(
        version=7, issued_at=NOW, site="lakeside", passes=[b"\x01" * 12], subjects=["P1"], blocked=["P2"]
    )
    text = sign_revocations(PRIV, rl)
    assert parse_revocations(text, RING) == rl
    raw = base64.urlsafe_b64decode(text[4:] + "=" * (-len(text[4:]) % 4))
    bad = bytearray(raw)
    bad[10] ^= 1
    tampered = "GR1:" + base64.urlsafe_b64encode(bytes(bad)).decode().rstrip("=")
    with pytest.raises(PassError) as e:
        parse_revocations(tampered, RING)
    assert e.value.reason == "bad-signature"
    with pytest.raises(PassError) as e:
        parse_revocations(sign_pass(PRIV, resident()), RING)
    assert e.value.reason == "malformed"
    with pytest.raises(PassError) as e:
        parse_revocations("GR1:" + "A" * (P.MAX_REVOCATION_CHARS + 1), RING)
    assert "longer than" in e.value.detail


def test_revocation_list_refuses_invalid_contents_when_signing() -> None:
    with pytest.raises(ValueError):
        sign_revocations(PRIV, RevocationList(version=0, issued_at=NOW, site="lakeside"))
    with pytest.raises(ValueError):
        sign_revocations(PRIV, RevocationList(version=1, issued_at=NOW, site="lakeside", passes=[b"x"]))
