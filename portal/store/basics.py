"""What every part of the store shares: UTC timestamps as the store keeps them, the audit chain's hash, the store key
of a connection."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from portal.store.errors import StoreError
from portal.store.storekey import StoreKey


def ts_text(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_text() -> str:
    return ts_text(datetime.now(UTC))


def key_of(conn: Any) -> StoreKey:
    """The store key a connection was opened with; a :class:`StoreError` naming the problem when it has none."""
    key = getattr(conn, "key", None)
    if key is None:
        raise StoreError("this needs the store key (store.key): open the store with it")
    return key


def audit_row_text(
    prev_hash: str, id: int, at: str, actor: str, action: str, target: str, detail: str, remote: str
) -> bytes:
    """What an audit row's hash is taken over: ``prev_hash`` followed by the row's fields as canonical JSON."""
    row = {"id": id, "at": at, "actor": actor, "action": action, "target": target, "detail": detail, "remote": remote}
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return (prev_hash + canonical).encode("utf-8", "surrogatepass")


def audit_hash(prev_hash: str, id: int, at: str, actor: str, action: str, target: str, detail: str, remote: str) -> str:
    """Plain SHA-256 (hex) of :func:`audit_row_text`: the chain from schema 5 until the store key."""
    return hashlib.sha256(audit_row_text(prev_hash, id, at, actor, action, target, detail, remote)).hexdigest()
