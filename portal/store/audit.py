"""The audit trail (alarm actions, door commands, views and exports of personal data) as a keyed hash chain.

Every row is written by :func:`write`, inside the caller's transaction (the store's single writer, or a
command-line tool's ``BEGIN IMMEDIATE``), so rows are chained one after another with no forks: a row's
``prev_hash`` is the hash of the row before it and its ``hash`` is HMAC-SHA-256, under the store key
(:mod:`portal.store.storekey`, a file outside the database), of that and its own fields
(:func:`portal.store.audit_row_text`). The ``audit_anchor`` row (newest id, newest hash, row count) is updated in the
same transaction. :func:`verify` walks the chain: an edited row fails its own hash, a deleted row breaks the next
row's ``prev_hash``, and rows deleted at the end leave the chain short of the anchor. Without the key, nobody who
can write to the database can compute a row's hash, so an edit cannot be hidden by chaining again.

Someone who holds the key as well (the portal's machine, taken over) could rewrite the whole chain. An
:class:`Anchor` (``python -m portal audit-anchor export``: the newest row's id and hash and the count) kept
elsewhere, on paper or another machine, pins the chain up to that row: ``audit-verify --anchor FILE`` fails
when that row is gone, different, or has other rows before it.

Stores from before the key (since schema 5) were chained with plain SHA-256; the store key's migration checks that
chain, chains it again with the key (:func:`key_the_chain`) and writes an ``audit.keyed`` row saying whether the
plain chain was intact. If it was not, :func:`verify` keeps saying so.

Retention prunes the oldest rows (:mod:`portal.estate.retention`) without breaking that: the chain then starts after the
``audit_epoch`` row (the last pruned row's id and hash, the number pruned). Before pruning, a ``retention.purge``
row naming the planned epoch is written into the chain (:func:`claim`), and :func:`prune` moves the epoch to at most
that point, in chunks. :func:`verify` holds the epoch to the newest such row, so moving the start further, or
deleting kept rows at the start and forging the epoch, is found like any other deletion. Runs may overlap (every
instance of a centre runs retention daily, an administrator runs ``purge``), each pruning towards its own claim: a
claim never plans less than the newest one before it (:func:`plan`), so claims only move forward in chain order,
every run's target is at or before the newest claim, and the start never passes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from portal.store import Conn, audit_hash, audit_row_text, db, key_of, now_text
from portal.store.storekey import StoreKey

# the column limits every writer has always applied
LIMITS = {"actor": 80, "action": 40, "target": 200, "detail": 500, "remote": 64}
PURGE_ACTION = "retention.purge"
KEYED_ACTION = "audit.keyed"
BROKEN_BEFORE = "the SHA-256 chain before it was BROKEN"
_CLAIM_RE = re.compile(r"^audit-epoch:(\d+):(\d+):([0-9a-f]{64})$")

#: (prev_hash, id, at, actor, action, target, detail, remote) -> the row's hash
Hasher = Callable[[str, int, str, str, str, str, str, str], str]


def keyed(key: StoreKey) -> Hasher:
    """The chain's hash: HMAC-SHA-256 under the store key."""

    def h(prev: str, rid: int, at: str, actor: str, action: str, target: str, detail: str, remote: str) -> str:
        return key.mac(audit_row_text(prev, rid, at, actor, action, target, detail, remote))

    return h


def write(
    conn: Conn, actor: str, action: str, target: str = "", detail: str = "", remote: str = "", *, at: str | None = None
) -> int:
    """Append one row to the chain (call inside a write transaction); returns its id."""
    fields = {"actor": actor, "action": action, "target": target, "detail": detail, "remote": remote}
    vals = {k: str(v or "")[: LIMITS[k]] for k, v in fields.items()}
    at = at or now_text()
    anchor = conn.execute("SELECT last_id, hash, count FROM audit_anchor WHERE id = 1").fetchone()
    top = conn.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()[0]
    prev = str(anchor[1]) if anchor else ""
    count = int(anchor[2]) if anchor else 0
    new_id = max(int(top), int(anchor[0]) if anchor else 0) + 1  # never reuse the id of a deleted last row
    h = keyed(key_of(conn))(
        prev, new_id, at, vals["actor"], vals["action"], vals["target"], vals["detail"], vals["remote"]
    )
    conn.execute(
        "INSERT INTO audit (id, at, actor, action, target, detail, remote, prev_hash, hash)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (new_id, at, vals["actor"], vals["action"], vals["target"], vals["detail"], vals["remote"], prev, h),
    )
    conn.execute(
        "INSERT INTO audit_anchor (id, last_id, hash, count) VALUES (1, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET last_id = excluded.last_id, hash = excluded.hash,"
        " count = excluded.count",
        (new_id, h, count + 1),
    )
    return new_id


# ---------------------------------------------------------------- pruning (the chain's start)


@dataclass(frozen=True, slots=True)
class Epoch:
    """Where the chain starts: rows up to ``through_id`` (``pruned`` of them in all) are gone; ``hash`` is the
    last one's, so the first kept row's ``prev_hash``. All zero and empty: nothing was ever pruned."""

    through_id: int = 0
    hash: str = ""
    pruned: int = 0

    def target(self) -> str:
        return f"audit-epoch:{self.through_id}:{self.pruned}:{self.hash}"

    @classmethod
    def parse(cls, target: str) -> Epoch | None:
        m = _CLAIM_RE.match(target)
        return cls(int(m.group(1)), m.group(3), int(m.group(2))) if m else None


def epoch(conn: Conn) -> Epoch:
    try:
        row = conn.execute("SELECT through_id, hash, pruned FROM audit_epoch WHERE id = 1").fetchone()
    except db.OperationalError:  # a store from before schema 7: never pruned
        return Epoch()
    return Epoch(int(row[0]), str(row[1]), int(row[2])) if row else Epoch()


def plan(conn: Conn, before: str) -> Epoch:
    """The epoch once every row older than ``before`` is pruned from the start. It stops at the first row that is
    not older (a clock that once ran backwards cannot make a hole), and never moves back: not before the epoch, nor
    before the newest ``retention.purge`` row's plan (another run's, maybe still pruning towards it)."""
    now = epoch(conn)
    claimed = _newest_claim(conn)
    floor = claimed[1] if claimed is not None and claimed[1] is not None else now
    cut = _cut(conn, now, before)
    return floor if floor.through_id > cut.through_id else cut


def _cut(conn: Conn, now: Epoch, before: str) -> Epoch:
    """The epoch once the rows after ``now`` that are older than ``before`` are pruned."""
    first_kept = conn.execute(
        "SELECT id FROM audit WHERE id > ? AND at >= ? ORDER BY id LIMIT 1", (now.through_id, before)
    ).fetchone()
    if first_kept is None:
        row = conn.execute(
            "SELECT id, hash FROM audit WHERE id > ? ORDER BY id DESC LIMIT 1", (now.through_id,)
        ).fetchone()
    else:
        row = conn.execute(
            "SELECT id, hash FROM audit WHERE id > ? AND id < ? ORDER BY id DESC LIMIT 1",
            (now.through_id, int(first_kept[0])),
        ).fetchone()
    if row is None:
        return now
    n = conn.execute("SELECT count(*) FROM audit WHERE id > ? AND id <= ?", (now.through_id, row[0])).fetchone()[0]
    return Epoch(int(row[0]), str(row[1]), now.pruned + int(n))


def claim(conn: Conn, actor: str, before: str, detail: Callable[[int], str]) -> tuple[Epoch, int, int]:
    """Plan the pruning of rows older than ``before`` and write the ``retention.purge`` row that attests it, with
    ``detail(rows to prune)`` (call inside a write transaction). Returns the planned epoch, the rows it prunes and
    the new row's id."""
    now = epoch(conn)
    planned = plan(conn, before)
    text = detail(planned.pruned - now.pruned)
    if len(text) > LIMITS["detail"]:
        raise ValueError(f"audit detail of {len(text)} characters is over {LIMITS['detail']}")
    row = write(conn, actor, PURGE_ACTION, planned.target() if planned.through_id else "", text)
    return planned, planned.pruned - now.pruned, row


def prune(conn: Conn, upto: Epoch, limit: int) -> int:
    """Delete at most ``limit`` rows from the start of the chain, never past ``upto`` (a :func:`claim`ed epoch), and
    move the epoch in the same transaction. Returns the rows deleted (0: done)."""
    now = epoch(conn)
    rows = conn.execute(
        "SELECT id, hash FROM audit WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
        (now.through_id, upto.through_id, limit),
    ).fetchall()
    if not rows:
        return 0
    last_id, last_hash = int(rows[-1][0]), str(rows[-1][1])
    n = conn.execute("DELETE FROM audit WHERE id > ? AND id <= ?", (now.through_id, last_id)).rowcount
    conn.execute(
        "INSERT INTO audit_epoch (id, through_id, hash, pruned, at) VALUES (1, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET through_id = excluded.through_id, hash = excluded.hash,"
        " pruned = excluded.pruned, at = excluded.at",
        (last_id, last_hash, now.pruned + n, now_text()),
    )
    return int(n)


# ---------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    rows: int  # rows checked before the first break (all of them when ok)
    bad_id: int | None = None  # the first broken row (for a short tail: the anchor's newest id)
    reason: str = ""


def _newest_claim(conn: Conn) -> tuple[int, Epoch | None] | None:
    row = conn.execute(
        "SELECT id, target FROM audit WHERE action = ? AND target LIKE 'audit-epoch:%' ORDER BY id DESC LIMIT 1",
        (PURGE_ACTION,),
    ).fetchone()
    return (int(row[0]), Epoch.parse(str(row[1]))) if row else None


def verify(conn: Conn, key: StoreKey | None = None, *, hasher: Hasher | None = None) -> Verdict:
    """Walk the kept chain in id order from the epoch; the first break found, or ok. The hash is the store key's
    (``key``, else the connection's); ``hasher`` stands in for it only to check a chain from before the key."""
    if hasher is None:
        hasher = keyed(key or key_of(conn))
    start = epoch(conn)
    claimed = _newest_claim(conn)
    if claimed is not None and claimed[1] is None:
        return Verdict(False, 0, claimed[0], "the retention.purge row's epoch cannot be read")
    want = claimed[1] if claimed is not None else None
    claim_id = claimed[0] if claimed is not None else None
    prev, prev_id, n, seen = start.hash, None, 0, False
    start_text = (
        f"the start of the chain (rows up to {start.through_id} were pruned)"
        if start.through_id
        else "the start of the chain"
    )
    for r in conn.execute(
        "SELECT id, at, actor, action, target, detail, remote, prev_hash, hash FROM audit ORDER BY id"
    ):
        rid = int(r[0])
        if rid <= start.through_id:
            return Verdict(
                False,
                n,
                rid,
                f"row {rid} is at or before the pruned start of the chain"
                f" (row {start.through_id}): it was put back, or the epoch was changed",
            )
        if r[7] != prev:
            where = f"row {prev_id}'s hash" if prev_id is not None else start_text
            return Verdict(
                False,
                n,
                rid,
                f"prev_hash does not match {where}: a row before it was deleted or its prev_hash was changed",
            )
        if hasher(prev, rid, r[1], r[2], r[3], r[4], r[5], r[6]) != r[8]:
            return Verdict(False, n, rid, "hash mismatch: the row was edited (or hashed without the store key)")
        prev, prev_id, n = r[8], rid, n + 1
        if want is None or rid != want.through_id:
            continue
        seen = True
        if (r[8], start.pruned + n) != (want.hash, want.pruned):
            return Verdict(
                False,
                n,
                rid,
                f"row {rid} is not the one the retention.purge row {claim_id} planned"
                " to prune through: rows at the start were deleted or the epoch changed",
            )
    bad = _check_epoch(start, want, claim_id, seen)
    if bad:
        return Verdict(False, n, claim_id, bad)
    anchor = conn.execute("SELECT last_id, hash, count FROM audit_anchor WHERE id = 1").fetchone()
    if anchor is None:
        return Verdict(False, n, None, "the audit_anchor row is missing")
    last_id, last_hash, count = int(anchor[0]), str(anchor[1]), int(anchor[2])
    end_id = prev_id if prev_id is not None else start.through_id
    if (last_id, last_hash, count) != (end_id, prev, n + start.pruned):
        return Verdict(
            False,
            n,
            last_id or None,
            f"the chain ends at row {end_id} ({n} rows, {start.pruned} pruned) but the anchor names row"
            f" {last_id} ({count} rows): rows at the end were deleted, or the anchor was changed",
        )
    broken = next(
        (
            r
            for r in conn.execute("SELECT id, detail FROM audit WHERE action = ? ORDER BY id", (KEYED_ACTION,))
            if BROKEN_BEFORE in r[1]
        ),
        None,
    )
    if broken is not None:
        return Verdict(
            False,
            n,
            int(broken[0]),
            f"the chain was already broken when the store key was introduced (row {broken[0]}): {broken[1]}",
        )
    return Verdict(True, n)


def key_the_chain(conn: Conn, key: StoreKey, *, plates: int = 0) -> int:
    """The store key's migration: chain every kept row again with the store key (call inside its transaction),
    after checking the plain SHA-256 chain, and write the ``audit.keyed`` row that says how that check went (not in
    a new, empty store). Returns the rows.

    Rows keep their fields; a ``retention.purge`` row whose planned epoch is a kept row gets that row's new hash
    (its claim must still match). The pruned start (``audit_epoch``) keeps its old hash: nothing before it is left
    to check, and it is only where the chain begins."""
    plain = verify(conn, hasher=audit_hash)
    mac = keyed(key)
    prev = epoch(conn).hash
    renamed: dict[str, str] = {}
    n = 0
    rows = conn.execute("SELECT id, at, actor, action, target, detail, remote, hash FROM audit ORDER BY id").fetchall()
    for rid, at, actor, action, target, detail, remote, old in rows:
        claim = Epoch.parse(target) if action == PURGE_ACTION else None
        if claim is not None and claim.hash in renamed:
            target = Epoch(claim.through_id, renamed[claim.hash], claim.pruned).target()
        h = mac(prev, rid, at, actor, action, target, detail, remote)
        conn.execute("UPDATE audit SET target = ?, prev_hash = ?, hash = ? WHERE id = ?", (target, prev, h, rid))
        renamed[old] = h
        prev, n = h, n + 1
    if n:
        conn.execute("UPDATE audit_anchor SET hash = ? WHERE id = 1", (prev,))
    elif not plates and plain.ok:
        return 0  # a new store: nothing was there before the key, nothing to say
    before = "intact" if plain.ok else f"{BROKEN_BEFORE} at row {plain.bad_id}: {plain.reason}"
    write(
        conn,
        "system",
        KEYED_ACTION,
        f"store-key:{key.fingerprint}",
        f"{n} rows chained with HMAC-SHA-256 under the store key, {plates} plate codes sealed; {before}"[:500],
    )
    return n


# ---------------------------------------------------------------- anchors kept elsewhere


@dataclass(frozen=True, slots=True)
class Anchor:
    """Where the chain stood when exported: its newest row, that row's hash, and how many rows it had."""

    id: int
    hash: str
    count: int
    store_key: str  # the fingerprint of the key the chain was made with
    at: str

    def text(self) -> str:
        return (
            json.dumps(
                {
                    "gatehouse_audit_anchor": 1,
                    "id": self.id,
                    "hash": self.hash,
                    "count": self.count,
                    "store_key": self.store_key,
                    "at": self.at,
                }
            )
            + "\n"
        )

    @classmethod
    def parse(cls, text: str) -> Anchor:
        """Raises ValueError for anything but an exported anchor."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(d, dict) or d.get("gatehouse_audit_anchor") != 1:
            raise ValueError("not an audit anchor (audit-anchor export writes them)")
        try:
            a = cls(int(d["id"]), str(d["hash"]), int(d["count"]), str(d["store_key"]), str(d["at"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"an audit anchor without a valid {e}") from None
        if a.id < 0 or a.count < 0 or not re.fullmatch(r"[0-9a-f]{64}|", a.hash):
            raise ValueError("an audit anchor with an impossible id, count or hash")
        return a


def anchor(conn: Conn) -> Anchor:
    row = conn.execute("SELECT last_id, hash, count FROM audit_anchor WHERE id = 1").fetchone()
    last_id, h, count = (int(row[0]), str(row[1]), int(row[2])) if row else (0, "", 0)
    return Anchor(last_id, h, count, key_of(conn).fingerprint, now_text())


def check_anchor(conn: Conn, a: Anchor) -> str:
    """'' when the chain still holds the anchor's row with its hash and the same number of rows up to it; else
    why not. Call after :func:`verify` found the chain itself intact."""
    mine = key_of(conn).fingerprint
    if a.store_key != mine:
        return f"the anchor is of a chain under store key {a.store_key}; this store's key is {mine}"
    start = epoch(conn)
    if a.id < start.through_id:
        return (
            f"row {a.id} of the anchor was pruned by retention (the chain now starts after row"
            f" {start.through_id}): check an anchor exported since"
        )
    if a.id == start.through_id:
        if (a.hash, a.count) != (start.hash, start.pruned):
            return f"the chain's pruned start (row {start.through_id}) is not the row the anchor names"
        return ""
    row = conn.execute("SELECT hash FROM audit WHERE id = ?", (a.id,)).fetchone()
    if row is None:
        last = conn.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()[0]
        if a.id > int(last):
            return f"the chain ends at row {last}, before row {a.id} of the anchor: rows were deleted since"
        return f"row {a.id} of the anchor is missing from the chain"
    if str(row[0]) != a.hash:
        return f"row {a.id} is not the row the anchor saw: the chain up to it was written again"
    count = start.pruned + int(
        conn.execute("SELECT count(*) FROM audit WHERE id > ? AND id <= ?", (start.through_id, a.id)).fetchone()[0]
    )
    if count != a.count:
        return f"the chain has {count} rows up to row {a.id}, the anchor {a.count}: rows were removed or added"
    return ""


def _check_epoch(start: Epoch, want: Epoch | None, claim_id: int | None, seen: bool) -> str:
    """Is the chain's start where the newest retention.purge row said pruning may take it? '' when it is."""
    if want is None:
        return (
            f"rows up to {start.through_id} were pruned but no retention.purge row in the kept chain attests it"
            if start.through_id
            else ""
        )
    if want.through_id < start.through_id:
        return (
            f"the chain starts after row {start.through_id}, past row {want.through_id} that the"
            f" retention.purge row {claim_id} planned to prune through"
        )
    if want.through_id == start.through_id and (want.hash, want.pruned) != (start.hash, start.pruned):
        return f"the audit_epoch row does not match the retention.purge row {claim_id}"
    if want.through_id > start.through_id and not seen:
        return f"row {want.through_id}, planned by the retention.purge row {claim_id}, is missing"
    return ""
