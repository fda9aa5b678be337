"""Ed25519 verification on the gateway's side: libsodium (PyNaCl), not cryptography.

A gateway only ever verifies (commands, passes, revocation lists); the portal and the installer's tooling
sign. cryptography links a whole OpenSSL into its Rust extension: importing it costs a gateway about 8 MB
resident, a fifth of what the daemon needs on a Pi. PyNaCl's libsodium verifies the same signatures for
about 1 MB. The wire format, the keys (PEM SubjectPublicKeyInfo files, the raw 32 bytes behind a key id)
and the signed bytes are unchanged; only the library that checks them differs. libsodium is the stricter
verifier of the two (it also refuses small-order keys and points, which no honest signer produces), so a
signature it accepts is one that OpenSSL accepts too.

:class:`PublicKey` is what :func:`gateway.wire.passes.load_public_key` returns and what a keyring holds.
:func:`as_public_key` also takes cryptography's ``Ed25519PublicKey`` (the signing side's type), so callers
that hold one (the portal, tests) verify through the same path; cryptography is never imported here.
"""

from __future__ import annotations

import base64
import binascii
import sys

from nacl.bindings import crypto_sign_BYTES, crypto_sign_open, crypto_sign_PUBLICKEYBYTES
from nacl.exceptions import BadSignatureError

#: DER of a SubjectPublicKeyInfo for Ed25519 (RFC 8410) up to the 32 key bytes: SEQUENCE { SEQUENCE { OID
#: 1.3.101.112 }, BIT STRING (0 unused bits) }.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN = b"-----BEGIN PUBLIC KEY-----"
_PEM_END = b"-----END PUBLIC KEY-----"
_CRYPTOGRAPHY_ED25519 = "cryptography.hazmat.primitives.asymmetric.ed25519"


class PublicKey:
    """An Ed25519 public key that verifies: the raw 32 bytes."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != crypto_sign_PUBLICKEYBYTES:
            raise ValueError(f"an Ed25519 public key is {crypto_sign_PUBLICKEYBYTES} bytes, not {len(raw)}")
        self.raw = bytes(raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when ``signature`` (64 bytes) is this key's over ``data``; False for anything else."""
        if len(signature) != crypto_sign_BYTES:
            return False
        try:
            crypto_sign_open(bytes(signature) + bytes(data), self.raw)
        except BadSignatureError:
            return False
        return True

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        """The key of a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo) file. ValueError unless it is exactly one
        Ed25519 public key."""
        text = data.strip()
        if not (text.startswith(_PEM_BEGIN) and text.endswith(_PEM_END)):
            raise ValueError("not a PEM public key (no BEGIN/END PUBLIC KEY lines)")
        b64 = b"".join(text[len(_PEM_BEGIN) : -len(_PEM_END)].split())
        try:
            der = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not a PEM public key (bad base64)") from None
        if len(der) != len(_SPKI_PREFIX) + crypto_sign_PUBLICKEYBYTES or not der.startswith(_SPKI_PREFIX):
            raise ValueError("not an Ed25519 public key")
        return cls(der[len(_SPKI_PREFIX) :])

    def to_pem(self) -> bytes:
        """The PEM SubjectPublicKeyInfo text, as cryptography writes it."""
        b64 = base64.b64encode(_SPKI_PREFIX + self.raw)
        return _PEM_BEGIN + b"\n" + b64 + b"\n" + _PEM_END + b"\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.raw.hex()[:16]}…)"


def as_public_key(key: object) -> PublicKey:
    """``key`` as a :class:`PublicKey`: one already, or cryptography's ``Ed25519PublicKey``. TypeError for
    anything else (a private key above all: a gateway holds public keys only)."""
    if isinstance(key, PublicKey):
        return key
    ed = sys.modules.get(_CRYPTOGRAPHY_ED25519)  # whoever holds such a key has imported it
    if ed is not None and isinstance(key, ed.Ed25519PublicKey):
        return PublicKey(key.public_bytes_raw())
    raise TypeError(f"Ed25519 public keys only, not {type(key).__name__}")
