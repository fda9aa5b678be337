"""SQLite connect-and-migrate, the one runner of the gateway's files (the store, the access module's file).

:func:`connect` opens a file in WAL mode with the durability the caller chooses; :func:`migrate` brings its
schema up to date with numbered steps, one transaction each, the step's number kept in ``PRAGMA
user_version``. A file from a newer program is refused, never "repaired" downwards.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Migration = Callable[[sqlite3.Connection], None]


class SchemaTooNew(Exception):
    """The file's schema is newer than every step this program knows."""


def connect(
    path: str | Path,
    *,
    synchronous: Literal["OFF", "NORMAL", "FULL"] = "FULL",
    busy_timeout_ms: int = 10_000,
    foreign_keys: bool = False,
    check_same_thread: bool = True,
    timeout: float = 5.0,
) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are the caller's ``BEGIN``), WAL journal."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=check_same_thread, timeout=timeout)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    if foreign_keys:
        conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    return conn


def migrate(conn: sqlite3.Connection, steps: Sequence[Migration], *, name: str) -> int:
    """Run the steps the file has not had yet (step i brings version i to i+1), each in its own ``BEGIN
    IMMEDIATE`` transaction with its new version; returns the version now. Raises :class:`SchemaTooNew`."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > len(steps):
        raise SchemaTooNew(f"{name}: schema version {version} is newer than this program knows ({len(steps)})")
    for i in range(version, len(steps)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            steps[i](conn)
            conn.execute(f"PRAGMA user_version={i + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info("%s migrated to schema v%d", name, i + 1)
    return len(steps)
