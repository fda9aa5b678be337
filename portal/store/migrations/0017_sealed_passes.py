"""17: visitor passes (``visitor_passes``: residents' passes behind a share link; ``guard_visitors``: guardroom
passes) are kept only sealed with the store key, bound to the pass id, as plate codes are since step 11: a copy of
the database (a backup) holds no pass that would open the estate gate and a building's entrance. ``pass_text`` is
replaced by ``sealed``; the portal opens it only to draw the pass's QR and for ``/api/visitors/{id}``."""

from __future__ import annotations

from typing import Any

from portal.store.engine import POSTGRESQL, dialect_of
from portal.store.errors import StoreError

TABLES = ("visitor_passes", "guard_visitors")


def upgrade(conn: Any) -> None:
    key = getattr(conn, "key", None)
    postgres = dialect_of(conn) == POSTGRESQL
    rows = {t: conn.execute(f"SELECT id, pass_id, pass_text FROM {t}").fetchall() for t in TABLES}
    if key is None and any(rows.values()):
        raise StoreError(
            "upgrading this store seals its visitor passes: open it with the store key (the portal makes one at its"
            " start)"
        )
    if not postgres:
        secure = int(conn.execute("PRAGMA secure_delete").fetchone()[0])
        conn.execute("PRAGMA secure_delete = ON")  # the rewritten rows' old cells are zeroed, not left with passes
    for table, found in rows.items():
        conn.execute(f"ALTER TABLE {table} ADD COLUMN sealed {'bytea' if postgres else 'BLOB'}")
        for r in found:
            assert key is not None
            conn.execute(f"UPDATE {table} SET sealed = ? WHERE id = ?", (key.seal(r[2], r[1]), r[0]))
        conn.execute(f"ALTER TABLE {table} DROP COLUMN pass_text")
    if not postgres:
        conn.execute(f"PRAGMA secure_delete = {secure}")
