"""The store key: a secret kept beside the database, never in it, for what the database must not hold alone.

* Door-plate codes are kept only to print plates again, sealed with AES-256-GCM (bound to the code's hash), so a
  copy of ``portal.db`` (a backup, a support bundle, a stolen disk image without the key file) prints no plate.
* The audit trail's rows are chained with HMAC-SHA-256, so someone who can write to the database but does not hold
  the key cannot edit a row and compute the chain again.

The key is 32 random bytes in hex in ``store.key_file`` (default ``data_dir/store.key``), mode 0600, made when a
store is first opened without one. Both uses get a key of their own derived from it (HKDF-SHA-256). The store
records the key's fingerprint (``store_meta``), and a key file that is not the store's, or a missing key of a store
that has sealed data, stops the portal with an error saying so, instead of silently sealing with another key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.configfile import ConfigError, read_secret, write_secret
from portal.store.engine import Error, Postgres, connect

log = logging.getLogger("portal.storekey")

KEY_FILE = "store.key"
NONCE_BYTES = 12


class StoreKeyError(RuntimeError):
    """The store key cannot be used: missing, unreadable, not this store's, or a sealed value that does not open."""


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"gatehouse store " + purpose).derive(secret)


class StoreKey:
    """Seals plate codes and MACs audit rows with keys derived from one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise ValueError("a store key is 32 bytes")
        self._mac_key = _derive(secret, b"audit chain v1")
        self._aead = AESGCM(_derive(secret, b"plate codes v1"))
        self.fingerprint = hmac.new(secret, b"gatehouse store key id", hashlib.sha256).hexdigest()[:16]

    def mac(self, data: bytes) -> str:
        return hmac.new(self._mac_key, data, hashlib.sha256).hexdigest()

    def seal(self, text: str, bound_to: str) -> bytes:
        """``text`` encrypted; it opens only with this key and the same ``bound_to`` (e.g. the code's hash)."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, text.encode(), bound_to.encode())

    def unseal(self, blob: bytes, bound_to: str) -> str:
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], bound_to.encode()).decode()
        except (InvalidTag, ValueError, UnicodeDecodeError):
            raise StoreKeyError(
                f"a sealed value ({bound_to[:16]}...) does not open with the store key "
                f"{self.fingerprint}: the key file is not the one it was sealed with"
            ) from None

    @classmethod
    def generate(cls) -> tuple[StoreKey, bytes]:
        secret = secrets.token_bytes(32)
        return cls(secret), secret


def recorded_fingerprint(db_path: Path | Postgres) -> str | None:
    """The fingerprint of the key a store was sealed with (None: a new store, or one from before the key)."""
    if not isinstance(db_path, Path):
        return _recorded_in_postgres(db_path)
    if not db_path.exists():
        return None
    try:
        conn = sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT value FROM store_meta WHERE name = 'store_key'").fetchone()
    except sqlite3.Error:  # no such table: a store from before the store key
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


def _recorded_in_postgres(target: Postgres) -> str | None:
    conn = connect(target, readonly=True)
    try:
        if conn.execute("SELECT to_regclass('store_meta')").fetchone()[0] is None:
            return None  # a new store
        row = conn.execute("SELECT value FROM store_meta WHERE name = 'store_key'").fetchone()
    except Error as e:
        raise StoreKeyError(f"cannot read the store key's fingerprint from the {target}: {e}") from None
    finally:
        conn.close()
    return str(row[0]) if row else None


def load(path: Path) -> StoreKey:
    try:
        text = read_secret(path)
    except ConfigError as e:
        raise StoreKeyError(str(e)) from None
    try:
        secret = bytes.fromhex(text)
        return StoreKey(secret)
    except ValueError:
        raise StoreKeyError(f"{path}: not a store key (64 hexadecimal digits)") from None


def open_for(path: Path, db_path: Path | Postgres) -> StoreKey:
    """The key of the store at ``db_path``: loaded from ``path``, or made there (0600) for a store that has none
    yet. Blocking (run it in a thread). Raises :class:`StoreKeyError` with what to do."""
    recorded = recorded_fingerprint(db_path)
    if path.exists():
        key = load(path)
        if recorded is not None and recorded != key.fingerprint:
            raise StoreKeyError(
                f"{path} (key {key.fingerprint}) is not the key of the store {db_path}, which was"
                f" sealed with key {recorded}: put that key file back"
            )
        return key
    if recorded is not None:
        raise StoreKeyError(
            f"the store {db_path} is sealed with key {recorded}, and its key file {path} is missing:"
            " restore it from where it is kept (without it, plates cannot be printed and the audit"
            " trail cannot be verified or extended)"
        )
    key, secret = StoreKey.generate()
    draft = path.with_name(f".{path.name}.{secrets.token_hex(6)}.new")
    write_secret(draft, (secret.hex() + "\n").encode())
    try:
        os.link(draft, path)  # only if there is none: a tool starting at the same moment takes the one made first
    except FileExistsError:
        return load(path)
    finally:
        draft.unlink(missing_ok=True)
    log.warning(
        "created the store key %s (%s, mode 0600): keep a copy apart from the database's backups", path, key.fingerprint
    )
    return key
