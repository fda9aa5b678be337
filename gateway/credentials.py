"""What the gateway remembers about passes between restarts: the record of used passes (replay
protection) and the current revocation list. Both live in SQLite tables of their own.

Tables (created if missing):

``access_used_passes``  one row per door opening by a pass: ``pass_id`` BLOB, ``door`` TEXT,
                        ``ts`` REAL (wall time of the opening), ``not_before``/``expires`` INTEGER
                        (the pass's window, so rows can be pruned once the pass is dead)
``access_used_horizon`` one row: ``before`` REAL — every pass expiring before it has been forgotten,
                        so such a pass must never open again, whatever the clock says
``access_revocations``  one row: ``version``, ``issued_at``, ``site``, ``received_at`` (wall),
                        ``body`` (the verified list as MessagePack) and ``signed`` (the text as received)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import sqlite_utils

from common import sqlite
from gateway.wire.passes import (
    PassError,
    RevocationList,
    decode_revocation_body,
    encode_revocation_body,
)


class UsedPasses(Protocol):
    """Where door openings by pass are remembered. The gateway's main store may implement this too."""

    def openings(self, pass_id: bytes) -> list[tuple[str, float]]:
        """The pass's recorded openings, (door, wall time), in the order they were recorded."""
        ...

    def record(self, pass_id: bytes, door: str, ts: float, *, not_before: int, expires: int) -> None:
        """Remember one opening, durably, before the door is opened."""
        ...

    def forget(self, pass_id: bytes, door: str, ts: float) -> None:
        """Take back one recorded opening (the door did not open after all)."""
        ...

    def prune(self, before: float) -> int:
        """Forget passes that expired before ``before`` and raise :meth:`horizon` to it. Returns rows removed."""
        ...

    def horizon(self) -> float:
        """The latest ``before`` ever pruned (0 if never)."""
        ...


class SqliteUsedPasses:
    """:class:`UsedPasses` in two small tables of a sqlite-utils database."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self._db = db
        db.execute(
            "CREATE TABLE IF NOT EXISTS access_used_passes ("
            " pass_id BLOB NOT NULL, door TEXT NOT NULL, ts REAL NOT NULL,"
            " not_before INTEGER NOT NULL, expires INTEGER NOT NULL)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS access_used_passes_id ON access_used_passes (pass_id, door)")
        db.execute("CREATE INDEX IF NOT EXISTS access_used_passes_exp ON access_used_passes (expires)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS access_used_horizon ("
            " id INTEGER PRIMARY KEY CHECK (id = 1), before REAL NOT NULL)"
        )
        row = db.execute("SELECT before FROM access_used_horizon WHERE id = 1").fetchone()
        self._horizon = float(row[0]) if row else 0.0

    def openings(self, pass_id: bytes) -> list[tuple[str, float]]:
        rows = self._db.execute(
            "SELECT door, ts FROM access_used_passes WHERE pass_id = ? ORDER BY rowid", (pass_id,)
        ).fetchall()
        return [(str(door), float(ts)) for door, ts in rows]

    def record(self, pass_id: bytes, door: str, ts: float, *, not_before: int, expires: int) -> None:
        self._db.execute(
            "INSERT INTO access_used_passes (pass_id, door, ts, not_before, expires) VALUES (?, ?, ?, ?, ?)",
            (pass_id, door, ts, not_before, expires),
        )

    def forget(self, pass_id: bytes, door: str, ts: float) -> None:
        self._db.execute(
            "DELETE FROM access_used_passes WHERE rowid = (SELECT rowid FROM access_used_passes"
            " WHERE pass_id = ? AND door = ? AND ts = ? ORDER BY rowid DESC LIMIT 1)",
            (pass_id, door, ts),
        )

    def prune(self, before: float) -> int:
        with self._db.atomic():
            n = self._db.execute("DELETE FROM access_used_passes WHERE expires < ?", (before,)).rowcount
            if before > self._horizon:
                self._db.execute(
                    "INSERT INTO access_used_horizon (id, before) VALUES (1, ?)"
                    " ON CONFLICT (id) DO UPDATE SET before = excluded.before",
                    (before,),
                )
        self._horizon = max(self._horizon, before)
        return n

    def horizon(self) -> float:
        return self._horizon


class RevocationRefused(PassError):
    """A correctly signed list that must not replace the current one. ``reason``: older, conflict, wrong-site."""


@dataclass(frozen=True, slots=True)
class Revocations:
    """One version of the revocation list, as sets for constant-time look-ups. Replaced whole, never edited."""

    version: int
    issued_at: int
    site: str
    passes: frozenset[bytes]
    subjects: frozenset[str]
    blocked: frozenset[str]

    @classmethod
    def of(cls, rl: RevocationList) -> Revocations:
        return cls(
            version=rl.version,
            issued_at=rl.issued_at,
            site=rl.site,
            passes=frozenset(rl.passes),
            subjects=frozenset(rl.subjects),
            blocked=frozenset(rl.blocked),
        )


EMPTY_REVOCATIONS = Revocations(0, 0, "", frozenset(), frozenset(), frozenset())


class RevocationStore:
    """The current revocation list, kept in one row and in memory.

    A new version is written in one transaction and only then swapped in memory (one assignment),
    so a reader sees the old list or the new one, never a mixture, and a failed write leaves the
    old one in force.
    """

    def __init__(self, db: sqlite_utils.Database, site: str) -> None:
        self._db = db
        self._site = site
        db.execute(
            "CREATE TABLE IF NOT EXISTS access_revocations ("
            " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, issued_at INTEGER NOT NULL,"
            " site TEXT NOT NULL, received_at REAL NOT NULL, body BLOB NOT NULL, signed TEXT NOT NULL)"
        )
        row = db.execute("SELECT body FROM access_revocations WHERE id = 1").fetchone()
        self.current: Revocations = Revocations.of(decode_revocation_body(row[0])) if row else EMPTY_REVOCATIONS

    def apply(self, rl: RevocationList, signed: str, received_at: float) -> bool:
        """Make a verified list current. False if this very version is already held (a re-send)."""
        cur = self.current
        if rl.site != self._site:
            raise RevocationRefused("wrong-site", f"list is for site {rl.site!r}, this gateway is {self._site!r}")
        if rl.version < cur.version:
            raise RevocationRefused("older", f"version {rl.version} < current {cur.version}")
        new = Revocations.of(rl)
        if rl.version == cur.version:
            if new == cur:
                return False
            raise RevocationRefused("conflict", f"version {rl.version} already held with other contents")
        self._db.execute(
            "INSERT INTO access_revocations (id, version, issued_at, site, received_at, body, signed)"
            " VALUES (1, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET version = excluded.version,"
            " issued_at = excluded.issued_at, site = excluded.site, received_at = excluded.received_at,"
            " body = excluded.body, signed = excluded.signed",
            (rl.version, rl.issued_at, rl.site, received_at, encode_revocation_body(rl), signed),
        )
        self.current = new
        return True


def open_access_db(path: str | Path) -> sqlite_utils.Database:
    """A database file of the access module's own (until the main store carries these tables).

    WAL with synchronous=NORMAL: a commit survives a crash of the process; a power cut may lose the
    last few openings (see the note in :mod:`gateway.access`).
    """
    return sqlite_utils.Database(sqlite.connect(path, synchronous="NORMAL", busy_timeout_ms=2000))
