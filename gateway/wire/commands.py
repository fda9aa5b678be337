"""Signed commands (wire v2): what a gateway needs to know that an order really comes from the portal.

The broker authenticates connections, not orders: anyone holding the portal's broker password (or any
account the ACL lets write a command topic) could publish an unlock. So every command is signed with the
portal's Ed25519 key (the pass-signing key of :mod:`gateway.wire.passes`; a distinct prefix keeps a
signature over a command from ever verifying as a pass or a revocation list, and back) and names the one
gateway it is for. A gateway holds only the public keys.

Payload on ``gatehouse/v1/<site>/<gateway>/cmd``, JSON::

    {"v": 2, "kid": "<8 hex>", "body": "<base64 of the JSON Command>", "sig": "<base64 of 64 bytes>"}

* ``body``: the :class:`gateway.wire.Command`, JSON-encoded, with ``v`` 2 and ``site``/``gateway`` set to
  its target. Carried as bytes, so what was signed is exactly what is decoded (no canonical-JSON games).
* ``sig``: Ed25519 over ``b"GC2:" || kid(4 bytes) || body``.

:func:`open_command` checks, in this order, before trusting anything inside: size, version (a v1 command
is ``unsigned``), envelope schema, key id (``unknown-key``), signature (``bad-signature``), then the
body's schema and its target (``wrong-gateway``) and its life (``too-long``: ``expires - ts`` over
:data:`gateway.wire.MAX_COMMAND_LIFE_S`). Expiry and replay (the ``id`` is the nonce) need a clock and a
memory, and are the gateway's to judge (:mod:`gateway.commands`).
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from gateway import wire
from gateway.wire.ed25519 import as_public_key
from gateway.wire.passes import key_id

if TYPE_CHECKING:  # only the portal signs; a gateway verifies with libsodium (gateway.wire.ed25519)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.wire.passes import VerifyingKey

COMMAND_PREFIX = b"GC2:"
_SIG_BYTES = 64


class SignedCommand(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    v: int
    kid: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{8}$")]
    body: Annotated[bytes, msgspec.Meta(min_length=2, max_length=wire.MAX_PAYLOAD_BYTES)]
    sig: Annotated[bytes, msgspec.Meta(min_length=_SIG_BYTES, max_length=_SIG_BYTES)]


_envelope = msgspec.json.Decoder(SignedCommand)
_encoder = msgspec.json.Encoder()


def sign_command(private_key: Ed25519PrivateKey, cmd: wire.Command, *, site: str, gateway: str) -> bytes:
    """The payload to publish on ``site``/``gateway``'s command topic. Raises ValueError for a command a
    gateway would refuse (a life over MAX_COMMAND_LIFE_S, times without a timezone, bad names)."""
    wire.topic(site, gateway, "cmd")  # checks both names
    if cmd.ts.tzinfo is None or cmd.expires.tzinfo is None:
        raise ValueError("a command's ts and expires must carry a timezone (UTC)")
    life = (cmd.expires - cmd.ts).total_seconds()
    if life > wire.MAX_COMMAND_LIFE_S:
        raise ValueError(f"a command may live at most {wire.MAX_COMMAND_LIFE_S} s, not {life:.0f} s")
    body = wire.encode(msgspec.structs.replace(cmd, v=wire.COMMAND_VERSION, site=site, gateway=gateway))
    kid = key_id(private_key.public_key())
    sig = private_key.sign(COMMAND_PREFIX + bytes.fromhex(kid) + body)
    return _encoder.encode(SignedCommand(v=wire.COMMAND_VERSION, kid=kid, body=body, sig=sig))


def open_command(payload: bytes, public_keys: Mapping[str, VerifyingKey], *, site: str, gateway: str) -> wire.Command:
    """Verify a command received on ``site``/``gateway``'s command topic. Raises :class:`gateway.wire.WireError`
    (reasons: too-large, malformed, schema, unsigned, bad-version, unknown-key, bad-signature, wrong-gateway,
    too-long) and nothing else; only a command that passed every check is returned."""
    if len(payload) > wire.MAX_PAYLOAD_BYTES:
        raise wire.WireError("too-large", f"{len(payload)} bytes > {wire.MAX_PAYLOAD_BYTES}")
    head = _head(payload)
    if head == 1:
        raise wire.WireError("unsigned", "a v1 command carries no signature")
    if head != wire.COMMAND_VERSION:
        raise wire.WireError("bad-version", f"v={head}, this side speaks v={wire.COMMAND_VERSION}")
    try:
        env = _envelope.decode(payload)
    except msgspec.ValidationError as e:
        raise wire.WireError("schema", str(e)[:200]) from None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, binascii.Error) as e:
        raise wire.WireError("malformed", str(e)[:200] or type(e).__name__) from None
    key = public_keys.get(env.kid)
    if key is None:
        raise wire.WireError("unknown-key", f"kid {env.kid}")
    if not as_public_key(key).verify(env.sig, COMMAND_PREFIX + bytes.fromhex(env.kid) + env.body):
        raise wire.WireError("bad-signature", f"kid {env.kid}")
    cmd = wire.decode_command_body(env.body)  # signed by a key we trust: a failure here is a portal bug
    if (cmd.site, cmd.gateway) != (site, gateway):
        raise wire.WireError("wrong-gateway", f"signed for {cmd.site[:64]}/{cmd.gateway[:64]}")
    if (cmd.expires - cmd.ts).total_seconds() > wire.MAX_COMMAND_LIFE_S:
        raise wire.WireError(
            "too-long", f"valid {(cmd.expires - cmd.ts).total_seconds():.0f} s, at most {wire.MAX_COMMAND_LIFE_S} s"
        )
    return cmd


def peek_command(payload: bytes) -> dict[str, Any]:
    """What a refused command *claims* (id, type, door, by), unverified and truncated, for the guards' view
    of an attempt. Never raises; {} when nothing can be read."""
    try:
        if len(payload) > wire.MAX_PAYLOAD_BYTES:
            return {}
        raw: Any = msgspec.json.decode(payload)
        if isinstance(raw, dict) and raw.get("v") == wire.COMMAND_VERSION and isinstance(raw.get("body"), str):
            raw = msgspec.json.decode(msgspec.json.decode(b'"' + raw["body"].encode() + b'"', type=bytes))
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, binascii.Error, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in (
        ("id", raw.get("id")),
        ("type", raw.get("type")),
        ("by", raw.get("by")),
        ("for", f"{raw.get('site')}/{raw.get('gateway')}" if raw.get("site") else None),
        ("door", raw["args"].get("door") if isinstance(raw.get("args"), dict) else None),
    ):
        if isinstance(value, str) and value:
            out[key] = value[:64]
    return out


def _head(payload: bytes) -> int:
    try:
        return msgspec.json.decode(payload, type=_Versioned).v
    except msgspec.ValidationError as e:
        raise wire.WireError("schema", str(e)[:200]) from None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as e:
        raise wire.WireError("malformed", str(e)[:200] or type(e).__name__) from None


class _Versioned(msgspec.Struct):
    v: int
