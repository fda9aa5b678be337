"""1-12 at once for a new PostgreSQL store (none is older): the tables of baseline_0012.sql, then what SQLite's step 11
does with the store key on a new store."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def upgrade(conn: Any) -> None:
    from portal.store import audit  # audit imports the store

    conn.executescript((Path(__file__).parent / "baseline_0012.sql").read_text(encoding="utf-8"))
    key = getattr(conn, "key", None)
    if key is not None:
        conn.execute("INSERT INTO store_meta (name, value) VALUES ('store_key', ?)", (key.fingerprint,))
        audit.key_the_chain(conn, key, plates=0)
