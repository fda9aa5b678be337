"""common/sqlite.py, the connect-and-migrate runner of the gateway's SQLite files, on real files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from common import sqlite
from gateway.credentials import open_access_db


def test_steps_run_once_each_in_order_and_a_failed_step_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    ran: list[int] = []

    def step(n: int) -> sqlite.Migration:
        def run(conn: sqlite3.Connection) -> None:
            ran.append(n)
            conn.execute(f"CREATE TABLE t{n} (x)")

        return run

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half (x)")
        raise RuntimeError("disk said no")

    conn = sqlite.connect(path)
    assert sqlite.migrate(conn, [step(1), step(2)], name="x") == 2
    assert sqlite.migrate(conn, [step(1), step(2)], name="x") == 2
    assert ran == [1, 2]
    with pytest.raises(RuntimeError):
        sqlite.migrate(conn, [step(1), step(2), broken], name="x")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchone() is None
    conn.close()
    conn = sqlite.connect(path)
    with pytest.raises(sqlite.SchemaTooNew, match="schema version 2 is newer than this program knows \\(1\\)"):
        sqlite.migrate(conn, [step(1)], name="x")
    conn.close()


def test_the_access_file_is_wal_with_normal_sync(tmp_path: Path) -> None:
    db = open_access_db(tmp_path / "access.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 2000
    db.conn.close()
