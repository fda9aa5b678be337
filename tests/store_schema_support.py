"""A store's schema as one engine-neutral description, read from each engine's own catalogue (SQLite's PRAGMAs,
PostgreSQL's pg_catalog), so two stores can be compared: tables, columns with the types the code uses, NOT NULL,
defaults, primary keys, unique constraints, foreign keys, CHECK constraints (how many) and named indexes with their
columns, uniqueness and partial predicates."""

from __future__ import annotations

import re
from typing import Any

from portal.store import db

SQLITE_TYPES = {
    "INTEGER": "integer",
    "BIGINT": "integer",
    "TEXT": "text",
    "REAL": "real",
    "DOUBLE PRECISION": "real",
    "BLOB": "blob",
}
PG_TYPES = {
    "bigint": "integer",
    "integer": "integer",
    "text": "text",
    "citext": "text",
    "double precision": "real",
    "bytea": "blob",
}
#: what the schema bookkeeping itself uses (PRAGMA user_version on SQLite)
BOOKKEEPING = {"schema_version"}


def _predicate(text: str | None) -> str:
    """A partial index's WHERE, spelled the same for both: no parentheses, casts or case, != for <>."""
    if not text:
        return ""
    t = re.sub(r"::\w+", "", text).replace("<>", "!=")
    return re.sub(r"[()\s]", "", t).lower()


def _default(text: str | None) -> str | None:
    if text is None:
        return None
    t = re.sub(r"::\w+( \w+)?$", "", str(text).strip())
    return t.strip("'")


def describe(conn: Any) -> dict[str, Any]:
    return _pg(conn) if db.dialect_of(conn) == db.POSTGRESQL else _sqlite(conn)


def _sqlite(conn: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tables = [
        r[0]
        for r in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    for t in tables:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (t,)).fetchone()[0]
        nocase = set(re.findall(r"\b(\w+)\s+TEXT\b[^,\n]*COLLATE NOCASE", sql))
        cols = {}
        pk = []
        for r in conn.execute(f"PRAGMA table_info({t})"):
            cols[r["name"]] = {
                "type": SQLITE_TYPES[r["type"]],
                "nocase": r["name"] in nocase,
                "not_null": bool(r["notnull"] or r["pk"]),
                "default": _default(r["dflt_value"]),
            }
            if r["pk"]:
                pk.append((r["pk"], r["name"]))
        uniques, indexes = set(), {}
        for r in conn.execute(f"PRAGMA index_list({t})"):
            columns = tuple(c["name"] for c in conn.execute(f"PRAGMA index_info({r['name']})"))
            if r["origin"] == "u":
                uniques.add(columns)
            elif r["origin"] == "c":
                where = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (r["name"],)).fetchone()[0]
                m = re.search(r"\bWHERE\b(.*)$", where, re.S)
                indexes[r["name"]] = {
                    "table": t,
                    "columns": columns,
                    "unique": bool(r["unique"]),
                    "where": _predicate(m.group(1) if m else None),
                }
        fks = {
            (r["from"], r["table"], r["to"], r["on_delete"].lower().replace(" ", "_"))
            for r in conn.execute(f"PRAGMA foreign_key_list({t})")
        }
        out[t] = {
            "columns": cols,
            "pk": tuple(n for _, n in sorted(pk)),
            "unique": uniques,
            "fks": fks,
            "checks": len(re.findall(r"\bCHECK\s*\(", sql)),
            "indexes": indexes,
        }
    return out


def _pg(conn: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tables = [
        r[0]
        for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
        if r[0] not in BOOKKEEPING
    ]
    for t in tables:
        cols = {}
        for r in conn.execute(
            "SELECT a.attname, format_type(a.atttypid, NULL) AS type, a.attnotnull, a.attidentity,"
            " pg_get_expr(d.adbin, d.adrelid) AS dflt FROM pg_attribute a"
            " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
            " WHERE a.attrelid = ?::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            (t,),
        ):
            cols[r["attname"]] = {
                "type": PG_TYPES[r["type"]],
                "nocase": r["type"] == "citext",
                "not_null": bool(r["attnotnull"]),
                "default": _default(r["dflt"]),
            }
        pk: tuple[str, ...] = ()
        uniques, indexes = set(), {}
        for r in conn.execute(
            "SELECT i.relname AS name, x.indisunique, x.indisprimary, pg_get_expr(x.indpred, x.indrelid) AS pred,"
            " (SELECT array_agg(a.attname ORDER BY k.n) FROM unnest(x.indkey) WITH ORDINALITY k(attnum, n)"
            "  JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum) AS cols,"
            " EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid) AS constraint"
            " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = ?::regclass",
            (t,),
        ):
            columns = tuple(r["cols"])
            if r["indisprimary"]:
                pk = columns
            elif r["constraint"]:
                uniques.add(columns)
            else:
                indexes[r["name"]] = {
                    "table": t,
                    "columns": columns,
                    "unique": bool(r["indisunique"]),
                    "where": _predicate(r["pred"]),
                }
        fks = set()
        for r in conn.execute(  # one row per column pair, as SQLite's foreign_key_list gives them
            "SELECT (SELECT attname FROM pg_attribute WHERE attrelid = c.conrelid AND attnum = k.src) AS src,"
            " c.confrelid::regclass::text AS ref,"
            " (SELECT attname FROM pg_attribute WHERE attrelid = c.confrelid AND attnum = k.dst) AS dst,"
            " c.confdeltype FROM pg_constraint c, unnest(c.conkey, c.confkey) AS k(src, dst)"
            " WHERE c.conrelid = ?::regclass AND c.contype = 'f'",
            (t,),
        ):
            action = {"a": "no_action", "c": "cascade", "n": "set_null", "r": "restrict", "d": "set_default"}
            fks.add((r["src"], r["ref"], r["dst"], action[r["confdeltype"]]))
        checks = conn.execute(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = ?::regclass AND contype = 'c'", (t,)
        ).fetchone()[0]
        out[t] = {"columns": cols, "pk": pk, "unique": uniques, "fks": fks, "checks": int(checks), "indexes": indexes}
    return out
