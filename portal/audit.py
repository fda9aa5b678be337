"""The audit trail (alarm actions, door commands, views and exports of personal data) as a hash chain.

Every row is written by :func:`write`, inside the caller's transaction (the store's single writer, or a
command-line tool's ``BEGIN IMMEDIATE``), so rows are chained one after another with no forks: a row's
``prev_hash`` is the hash of the row before it and its ``hash`` is :func:`portal.store.audit_hash` of that and its
own fields. The ``audit_anchor`` row (newest id, newest hash, row count) is updated in the same transaction.
:func:`verify` walks the chain: an edited row fails its own hash, a deleted row breaks the next row's
``prev_hash``, and rows deleted at the end leave the chain short of the anchor.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from portal.store import audit_hash, now_text

# the column limits every writer has always applied
LIMITS = {"actor": 80, "action": 40, "target": 200, "detail": 500, "remote": 64}


def write(conn: sqlite3.Connection, actor: str, action: str, target: str = "", detail: str = "", remote: str = "",
          *, at: str | None = None) -> int:
    """Append one row to the chain (call inside a write transaction); returns its id."""
    fields = {"actor": actor, "action": action, "target": target, "detail": detail, "remote": remote}
    vals = {k: str(v or "")[:LIMITS[k]] for k, v in fields.items()}
    at = at or now_text()
    anchor = conn.execute("SELECT last_id, hash, count FROM audit_anchor WHERE id = 1").fetchone()
    top = conn.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()[0]
    prev = str(anchor[1]) if anchor else ""
    count = int(anchor[2]) if anchor else 0
    new_id = max(int(top), int(anchor[0]) if anchor else 0) + 1  # never reuse the id of a deleted last row
    h = audit_hash(prev, new_id, at, vals["actor"], vals["action"], vals["target"], vals["detail"], vals["remote"])
    conn.execute("INSERT INTO audit (id, at, actor, action, target, detail, remote, prev_hash, hash)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (new_id, at, vals["actor"], vals["action"], vals["target"], vals["detail"], vals["remote"], prev, h))
    conn.execute("INSERT INTO audit_anchor (id, last_id, hash, count) VALUES (1, ?, ?, ?)"
                 " ON CONFLICT (id) DO UPDATE SET last_id = excluded.last_id, hash = excluded.hash,"
                 " count = excluded.count", (new_id, h, count + 1))
    return new_id


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    rows: int  # rows checked before the first break (all of them when ok)
    bad_id: int | None = None  # the first broken row (for a short tail: the anchor's newest id)
    reason: str = ""


def verify(conn: sqlite3.Connection) -> Verdict:
    """Walk the whole chain in id order; the first break found, or ok."""
    prev, prev_id, n = "", None, 0
    for r in conn.execute("SELECT id, at, actor, action, target, detail, remote, prev_hash, hash FROM audit"
                          " ORDER BY id"):
        rid = int(r[0])
        if r[7] != prev:
            where = f"row {prev_id}'s hash" if prev_id is not None else "the start of the chain"
            return Verdict(False, n, rid, f"prev_hash does not match {where}: a row before it was deleted or its"
                                          " prev_hash was changed")
        if audit_hash(prev, rid, r[1], r[2], r[3], r[4], r[5], r[6]) != r[8]:
            return Verdict(False, n, rid, "hash mismatch: the row was edited")
        prev, prev_id, n = r[8], rid, n + 1
    anchor = conn.execute("SELECT last_id, hash, count FROM audit_anchor WHERE id = 1").fetchone()
    if anchor is None:
        return Verdict(False, n, None, "the audit_anchor row is missing")
    last_id, last_hash, count = int(anchor[0]), str(anchor[1]), int(anchor[2])
    if (last_id, last_hash, count) != (prev_id or 0, prev, n):
        return Verdict(False, n, last_id or None,
                       f"the chain ends at row {prev_id} ({n} rows) but the anchor names row {last_id} ({count} rows):"
                       " rows at the end were deleted, or the anchor was changed")
    return Verdict(True, n)
