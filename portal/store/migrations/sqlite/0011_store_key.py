"""11: the store key (portal/store/storekey.py), a file outside the database: plate codes are kept only sealed with it,
and only while the plate is in use (withdrawn ones dropped); the audit chain is re-chained with HMAC under it."""

from __future__ import annotations

from typing import Any

from portal.store.errors import StoreError


def upgrade(conn: Any) -> None:
    from portal.store import audit  # audit imports the store

    key = getattr(conn, "key", None)
    conn.execute("CREATE TABLE store_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
    in_use = conn.execute("SELECT code_hash, code FROM plates WHERE withdrawn_at IS NULL").fetchall()
    if key is None and (in_use or conn.execute("SELECT 1 FROM audit LIMIT 1").fetchone()):
        raise StoreError(
            "upgrading this store seals its plate codes and keys its audit trail: open it with the"
            " store key (the portal makes one at its start)"
        )
    conn.execute("""
        CREATE TABLE plates_sealed (
            code_hash TEXT PRIMARY KEY,      -- sha256 of the code: looked up by this, never by the code
            sealed BLOB,                     -- the code, AES-GCM under the store key and bound to code_hash, to
                                             -- print the plate again; NULL once the plate is withdrawn
            kind TEXT NOT NULL CHECK (kind IN ('house', 'entrance')),
            house_id INTEGER REFERENCES reg_houses(id),
            unit_id INTEGER REFERENCES reg_units(id),
            created_at TEXT NOT NULL,
            withdrawn_at TEXT,
            CHECK ((kind = 'house') = (house_id IS NOT NULL) AND (kind = 'entrance') = (unit_id IS NOT NULL)),
            CHECK (withdrawn_at IS NOT NULL OR sealed IS NOT NULL)
        ) WITHOUT ROWID""")
    conn.execute(
        "INSERT INTO plates_sealed (code_hash, sealed, kind, house_id, unit_id, created_at, withdrawn_at)"
        " SELECT code_hash, NULL, kind, house_id, unit_id, created_at, withdrawn_at FROM plates"
        " WHERE withdrawn_at IS NOT NULL"
    )
    for digest, code in in_use:
        assert key is not None
        conn.execute(
            "INSERT INTO plates_sealed (code_hash, sealed, kind, house_id, unit_id, created_at)"
            " SELECT code_hash, ?, kind, house_id, unit_id, created_at FROM plates WHERE code_hash = ?",
            (key.seal(code, digest), digest),
        )
    in_use_only = "WHERE withdrawn_at IS NULL AND {0} IS NOT NULL"
    secure = int(conn.execute("PRAGMA secure_delete").fetchone()[0])
    conn.execute("PRAGMA secure_delete = ON")  # the old table's pages are zeroed, not left with the codes in them
    for sql in (
        "DROP TABLE plates",
        "ALTER TABLE plates_sealed RENAME TO plates",
        f"CREATE UNIQUE INDEX plates_house ON plates(house_id) {in_use_only.format('house_id')}",
        f"CREATE UNIQUE INDEX plates_unit ON plates(unit_id) {in_use_only.format('unit_id')}",
    ):
        conn.execute(sql)  # (executescript would commit the migration's transaction first)
    conn.execute(f"PRAGMA secure_delete = {secure}")
    if key is not None:
        conn.execute("INSERT INTO store_meta (name, value) VALUES ('store_key', ?)", (key.fingerprint,))
        audit.key_the_chain(conn, key, plates=len(in_use))
