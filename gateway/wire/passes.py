"""Signed access passes and revocation lists: the contract between the portal (which signs) and the
gateways (which verify, offline, holding only public keys).

Pass text, version 1::

    GH1:<base32 of  kid(4) || body || signature(64)>

* ``GH1:`` — scheme and format version. Upper-case base32 without padding keeps the whole text in
  the QR alphanumeric character set (5.5 bits a character), so a resident pass fits a version 7 code.
* ``kid`` — the first 4 bytes of SHA-256 over the raw 32-byte public key (:func:`key_id`), so keys
  can rotate: a gateway holds every public key still in use, keyed by kid.
* ``body`` — MessagePack array (:class:`_Body`): pass id (12 random bytes), kind (0 resident,
  1 visitor), site, subject, house, unit references ``building/unit``, door names, the site-gates
  flag, not-before (unix seconds), life in seconds, uses, schedule name or nil.
* ``signature`` — Ed25519 over ``b"GH1:" || kid || body``.

A reader checks, in this order and before looking inside the body: length (at most
:data:`MAX_PASS_CHARS`, refused before any decoding), prefix, canonical base32, key id, signature.
Only a correctly signed body is decoded, so a pass that fails its signature never yields fields.

Revocation lists travel the same way as ``GR1:<base64url of kid || body || signature>`` with the
signature over ``b"GR1:" || kid || body``; the different prefix keeps a pass from being passed off
as a list and back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from gateway.wire.ed25519 import PublicKey, as_public_key

if TYPE_CHECKING:  # cryptography only on the signing side (portal, tooling): a gateway verifies with libsodium
    from typing import TypeAlias

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    #: A key that verifies: the gateway's own (:class:`PublicKey`) or the signing side's cryptography key.
    VerifyingKey: TypeAlias = PublicKey | Ed25519PublicKey

PASS_PREFIX = "GH1:"
REVOCATION_PREFIX = "GR1:"
#: Longest pass text a reader will look at; anything longer is refused before any decoding.
MAX_PASS_CHARS = 512
#: Longest revocation-list text (it rides in an MQTT command, limited to 256 kB in all).
MAX_REVOCATION_CHARS = 200_000
PASS_ID_BYTES = 12
#: Longest life a pass may have (a visitor pass for a long stay); anything longer is refused.
MAX_LIFE_S = 366 * 86400
MAX_USES = 1000
_KID_BYTES = 4
_SIG_BYTES = 64
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")

PassKind = Literal["resident", "visitor"]
_KINDS: tuple[PassKind, PassKind] = ("resident", "visitor")

_Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
_Subject = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
_UnitRef = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
_PassId = Annotated[bytes, msgspec.Meta(min_length=PASS_ID_BYTES, max_length=16)]
_U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]


class PassError(ValueError):
    """A pass or list that cannot be used. ``reason``: malformed, unknown-key or bad-signature."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class KeyFileError(ValueError):
    """A key file that is missing, unreadable, of the wrong kind or too open (a private key not 0600)."""


def new_pass_id() -> bytes:
    return secrets.token_bytes(PASS_ID_BYTES)


class PassFields(msgspec.Struct, frozen=True, kw_only=True):
    """What the portal puts in a pass.

    ``units`` are ``building/unit`` references (a door whose place is that unit opens), ``doors``
    name single doors, ``gates`` opens every site gate. A resident pass opens each door at most
    ``uses`` times; a visitor pass opens ``uses`` times in all. ``schedule`` names a weekly schedule
    in the gateway's config that further limits when the pass opens anything.
    """

    kind: PassKind
    site: str
    subject: str
    not_before: int
    not_after: int
    house: str = ""
    units: tuple[str, ...] = ()
    doors: tuple[str, ...] = ()
    gates: bool = False
    uses: int = 1
    schedule: str | None = None
    pass_id: bytes = msgspec.field(default_factory=new_pass_id)


class Pass(PassFields, frozen=True, kw_only=True):
    """A pass whose signature has been verified, with the id of the key that signed it."""

    kid: str

    @property
    def pass_id_hex(self) -> str:
        return self.pass_id.hex()

    @property
    def life_s(self) -> int:
        return self.not_after - self.not_before


class _Body(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    pass_id: _PassId
    kind: Annotated[int, msgspec.Meta(ge=0, le=1)]
    site: _Name
    subject: _Subject
    house: Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})?$")]
    units: Annotated[list[_UnitRef], msgspec.Meta(max_length=16)]
    doors: Annotated[list[_Name], msgspec.Meta(max_length=16)]
    gates: bool
    not_before: _U32
    life: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIFE_S)]
    uses: Annotated[int, msgspec.Meta(ge=1, le=MAX_USES)]
    schedule: _Name | None


class RevocationList(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    """The portal's list of what no longer opens a door. A newer ``version`` replaces an older one
    entirely. ``passes`` are pass ids; ``subjects`` are people or visitor registrations whose every
    pass is revoked; ``blocked`` are people refused outright (reported as *blocked*)."""

    version: Annotated[int, msgspec.Meta(ge=1, le=2**53)]
    issued_at: _U32
    site: _Name
    passes: list[_PassId] = []
    subjects: list[_Subject] = []
    blocked: list[_Subject] = []


_body_decoder = msgspec.msgpack.Decoder(_Body)
_revocation_decoder = msgspec.msgpack.Decoder(RevocationList)
_encoder = msgspec.msgpack.Encoder()


# ---------------------------------------------------------------- keys


def key_id(public_key: VerifyingKey) -> str:
    """The key's id as 8 hex characters: the first 4 bytes of SHA-256 over its raw bytes."""
    return _kid_bytes(public_key).hex()


def _kid_bytes(public_key: VerifyingKey) -> bytes:
    return hashlib.sha256(as_public_key(public_key).raw).digest()[:_KID_BYTES]


def generate_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    return private, private.public_key()


def keyring(keys: Iterable[VerifyingKey]) -> dict[str, PublicKey]:
    """``{kid: key}`` for :func:`parse_pass`. Only public keys are accepted (TypeError for anything else)."""
    ring: dict[str, PublicKey] = {}
    for k in keys:
        try:
            key = as_public_key(k)
        except TypeError:
            raise TypeError(f"a keyring holds Ed25519 public keys only, not {type(k).__name__}") from None
        ring[key_id(key)] = key
    return ring


def _write_atomic(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; refusing to overwrite a key")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_private_key(path: str | os.PathLike[str], key: Ed25519PrivateKey, *, overwrite: bool = False) -> None:
    """Write the key as unencrypted PKCS#8 PEM in a file of mode 0600 (atomically)."""
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_atomic(Path(path), pem, 0o600, overwrite=overwrite)


def save_public_key(path: str | os.PathLike[str], key: VerifyingKey, *, overwrite: bool = False) -> None:
    """Write the key as PEM SubjectPublicKeyInfo (what cryptography and OpenSSL write) in a file of mode 0644."""
    pem = as_public_key(key).to_pem()
    _write_atomic(Path(path), pem, 0o644, overwrite=overwrite)


def _read_key_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > 16_384:
        raise KeyFileError(f"{path}: too large to be a key file")
    return data


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load a PEM private key, refusing a file that group or others can read."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise KeyFileError(f"{p}: cannot read: {e.strerror or e}") from None
    if st.st_mode & 0o077:
        raise KeyFileError(f"{p}: a private key file must not be readable by group or others (chmod 600)")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(_read_key_file(p), password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{p}: not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{p}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """The Ed25519 public key of a PEM SubjectPublicKeyInfo file; KeyFileError for anything else."""
    p = Path(path)
    data = _read_key_file(p)
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{p}: holds a private key; a gateway must be given only the public key")
    try:
        return PublicKey.from_pem(data)
    except ValueError as e:
        raise KeyFileError(f"{p}: {e}") from None


def load_public_keys(paths: Iterable[str | os.PathLike[str]]) -> dict[str, PublicKey]:
    return keyring(load_public_key(p) for p in paths)


# ---------------------------------------------------------------- passes


def _b32encode(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=")


def _b32decode_canonical(text: str) -> bytes:
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise PassError("malformed", "not base32") from None
    if _b32encode(raw) != text:  # stray padding or non-zero trailing bits
        raise PassError("malformed", "not canonical base32")
    return raw


def _check_fields(fields: PassFields) -> _Body:
    if fields.kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}")
    body = _Body(
        pass_id=fields.pass_id,
        kind=_KINDS.index(fields.kind),
        site=fields.site,
        subject=fields.subject,
        house=fields.house,
        units=list(fields.units),
        doors=list(fields.doors),
        gates=fields.gates,
        not_before=fields.not_before,
        life=fields.not_after - fields.not_before,
        uses=fields.uses,
        schedule=fields.schedule,
    )
    try:  # the reader's own validation, so the portal never signs what a gateway would refuse
        return msgspec.msgpack.decode(_encoder.encode(body), type=_Body)
    except msgspec.ValidationError as e:
        raise ValueError(f"invalid pass fields: {e}") from None


def encode_body(fields: PassFields) -> bytes:
    """The unsigned body bytes; exposed for size estimates and tests."""
    return _encoder.encode(_check_fields(fields))


def sign_pass(private_key: Ed25519PrivateKey, fields: PassFields) -> str:
    """The pass as QR text. Raises ValueError for fields a gateway would refuse."""
    body = encode_body(fields)
    signed = _kid_bytes(private_key.public_key()) + body
    sig = private_key.sign(PASS_PREFIX.encode() + signed)
    return PASS_PREFIX + _b32encode(signed + sig)


def _verify(prefix: str, raw: bytes, public_keys: Mapping[str, VerifyingKey]) -> tuple[str, bytes]:
    if len(raw) < _KID_BYTES + 1 + _SIG_BYTES:
        raise PassError("malformed", "too short")
    kid = raw[:_KID_BYTES].hex()
    key = public_keys.get(kid)
    if key is None:
        raise PassError("unknown-key", f"kid {kid}")
    if not as_public_key(key).verify(raw[-_SIG_BYTES:], prefix.encode() + raw[:-_SIG_BYTES]):
        raise PassError("bad-signature", f"kid {kid}")
    return kid, raw[_KID_BYTES:-_SIG_BYTES]


def _as_text(data: str | bytes | bytearray, limit: int) -> str:
    if len(data) > limit:
        raise PassError("malformed", f"longer than {limit} characters")
    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("ascii")
        except UnicodeDecodeError:
            raise PassError("malformed", "not ASCII") from None
    return text.strip(" \t\r\n")


def parse_pass(text: str | bytes | bytearray, public_keys: Mapping[str, VerifyingKey]) -> Pass:
    """Verify and decode a scanned pass. Raises :class:`PassError` and nothing else.

    Checks only the pass itself; the validity window, door rights, revocation and replay are the
    gateway's to judge.
    """
    text = _as_text(text, MAX_PASS_CHARS)
    if not text.startswith(PASS_PREFIX):
        detail = "unsupported pass version" if text[:2] == "GH" and text[3:4] == ":" else "not a pass"
        raise PassError("malformed", detail)
    raw = _b32decode_canonical(text[len(PASS_PREFIX) :])
    kid, body_bytes = _verify(PASS_PREFIX, raw, public_keys)
    try:
        body = _body_decoder.decode(body_bytes)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # signed by a key we trust, yet invalid: a portal bug
        raise PassError("malformed", f"signed body invalid: {str(e)[:120]}") from None
    return Pass(
        kind=_KINDS[body.kind],
        site=body.site,
        subject=body.subject,
        house=body.house,
        units=tuple(body.units),
        doors=tuple(body.doors),
        gates=body.gates,
        not_before=body.not_before,
        not_after=body.not_before + body.life,
        uses=body.uses,
        schedule=body.schedule,
        pass_id=body.pass_id,
        kid=kid,
    )


# ---------------------------------------------------------------- revocation lists


def sign_revocations(private_key: Ed25519PrivateKey, rl: RevocationList) -> str:
    try:
        body = _encoder.encode(msgspec.msgpack.decode(_encoder.encode(rl), type=RevocationList))
    except msgspec.ValidationError as e:
        raise ValueError(f"invalid revocation list: {e}") from None
    signed = _kid_bytes(private_key.public_key()) + body
    sig = private_key.sign(REVOCATION_PREFIX.encode() + signed)
    text = REVOCATION_PREFIX + base64.urlsafe_b64encode(signed + sig).decode("ascii").rstrip("=")
    if len(text) > MAX_REVOCATION_CHARS:
        raise ValueError(f"revocation list too long ({len(text)} > {MAX_REVOCATION_CHARS} characters)")
    return text


def parse_revocations(text: str | bytes, public_keys: Mapping[str, VerifyingKey]) -> RevocationList:
    """Verify and decode a revocation list. Raises :class:`PassError` and nothing else."""
    text = _as_text(text, MAX_REVOCATION_CHARS)
    if not text.startswith(REVOCATION_PREFIX):
        raise PassError("malformed", "not a revocation list")
    b64 = text[len(REVOCATION_PREFIX) :]
    # urlsafe_b64decode skips stray characters and reads "+" as "-": check the alphabet ourselves, and
    # re-encode, so that no other spelling (nor changed trailing bits) of a signed list verifies.
    if not _B64URL_RE.fullmatch(b64):
        raise PassError("malformed", "not base64url")
    try:
        raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    except (binascii.Error, ValueError):
        raise PassError("malformed", "not base64url") from None
    if base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != b64:
        raise PassError("malformed", "not canonical base64url")
    _kid, body = _verify(REVOCATION_PREFIX, raw, public_keys)
    return decode_revocation_body(body)


def encode_revocation_body(rl: RevocationList) -> bytes:
    return _encoder.encode(rl)


def decode_revocation_body(body: bytes) -> RevocationList:
    """Decode an already verified list body (as kept in a gateway's own store)."""
    try:
        return _revocation_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec raises the latter for a str not UTF-8
        raise PassError("malformed", f"revocation list body invalid: {str(e)[:120]}") from None
