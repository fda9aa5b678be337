"""The schema's history: numbered steps in ``migrations/``, one history for both engines.

A step is a file ``NNNN_name.sql`` (SQL) or ``NNNN_name.py`` (a Python ``upgrade(conn)``, for what SQL cannot say,
such as sealing plate codes with the store key). A step written in the subset both engines read sits in
``migrations/`` itself and runs on both; a step that must differ has one file in ``migrations/sqlite/`` and one in
``migrations/postgresql/`` under the same number. Every number from 1 to :data:`SCHEMA_VERSION` has exactly one
step per engine. PostgreSQL stores start at a *baseline* (``NNNN_baseline``): everything up to NNNN at once, as the
SQLite steps leave it, since no PostgreSQL store is older than that; every later step exists for both.

Each step is one transaction; the version it reaches is ``PRAGMA user_version`` on SQLite (as it always was) and the
``schema_version`` row on PostgreSQL. tests/test_store_schema.py proves that both engines end at the same tables,
columns, indexes and constraints.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from portal.store.engine import MIGRATE_LOCK, POSTGRESQL, SQLITE, dialect_of
from portal.store.errors import StoreError

log = logging.getLogger("portal.store")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
DIALECTS = (SQLITE, POSTGRESQL)
_STEP = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(sql|py)$")
#: the database collations under which text sorts by code point, as SQLite's BINARY does (ids, timestamps)
BYTE_ORDER_COLLATIONS = ("C", "POSIX", "C.UTF-8", "C.utf8", "ucs_basic")


@dataclass(frozen=True, slots=True)
class Step:
    version: int
    name: str
    path: Path

    @property
    def baseline(self) -> bool:
        return self.name == "baseline"

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    def function(self) -> Callable[[Any], None]:
        spec = importlib.util.spec_from_file_location(
            f"portal.store.migrations._{self.path.parent.name}_{self.path.stem}", self.path
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fn: Callable[[Any], None] = module.upgrade
        return fn


@cache
def steps(dialect: str) -> tuple[Step, ...]:
    """The steps of one engine, in order; a :class:`StoreError` for a hole or a number given twice."""
    if dialect not in DIALECTS:
        raise StoreError(f"no such store engine: {dialect}")
    found: dict[int, Step] = {}
    for folder in (MIGRATIONS_DIR, MIGRATIONS_DIR / dialect):
        for p in sorted(folder.iterdir()):
            m = _STEP.match(p.name)
            if m is None:
                continue
            n = int(m.group(1))
            if n in found:
                raise StoreError(f"schema step {n} twice for {dialect}: {found[n].path.name} and {p.name}")
            found[n] = Step(n, m.group(2), p)
    numbers = sorted(found)
    if not numbers:
        raise StoreError(f"no schema steps for {dialect}")
    first = found[numbers[0]]
    if numbers[0] != 1 and not first.baseline:
        raise StoreError(f"the {dialect} steps start at {numbers[0]} with {first.path.name}, not a baseline")
    if numbers != list(range(numbers[0], numbers[-1] + 1)):
        holes = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
        raise StoreError(f"the {dialect} schema steps lack {holes}")
    if any(found[n].baseline for n in numbers[1:]):
        raise StoreError(f"only the first {dialect} step may be a baseline")
    return tuple(found[n] for n in numbers)


def latest(dialect: str = SQLITE) -> int:
    return steps(dialect)[-1].version


#: the schema this portal brings a store to (both engines: tests/test_store_schema.py)
SCHEMA_VERSION = latest(SQLITE)


def schema_version(conn: Any) -> int:
    """The version a store is at (0: a new one)."""
    if dialect_of(conn) == POSTGRESQL:
        if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            return 0
        row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
        return int(row[0]) if row else 0
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: Any, *, upto: int | None = None) -> int:
    """Bring the schema up to date (or up to the step ``upto``: a store as an older portal left it, for tests of
    upgrades); returns the version. Each step is one transaction."""
    if dialect_of(conn) == POSTGRESQL:
        return _migrate_postgres(conn, upto)
    return _migrate_sqlite(conn, upto)


def _too_new(version: int, dialect: str) -> StoreError:
    return StoreError(f"the store is at schema {version}, newer than this portal ({latest(dialect)})")


def _migrate_sqlite(conn: Any, upto: int | None) -> int:
    from portal.store.basics import audit_hash

    conn.create_function("audit_hash", 8, audit_hash, deterministic=True)  # for step 5's backfill
    version = schema_version(conn)
    if version > latest(SQLITE):
        raise _too_new(version, SQLITE)
    for step in steps(SQLITE)[version:upto]:
        n = step.version
        # Foreign keys off while a step runs (a table rebuilt as SQLite documents it: create, copy, drop, rename),
        # and checked before its commit; the setting can only change outside a transaction.
        conn.execute("PRAGMA foreign_keys = OFF")
        try:
            if step.path.suffix == ".sql":
                conn.executescript(f"BEGIN IMMEDIATE;\n{step.sql()}\nPRAGMA user_version = {n};")
            else:  # a step in Python (executescript would commit its transaction first)
                conn.execute("BEGIN IMMEDIATE")
                step.function()(conn)
                conn.execute(f"PRAGMA user_version = {n}")
            broken = conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise StoreError(
                    f"schema step {n} would leave {len(broken)} broken references (first: {tuple(broken[0])})"
                )
            conn.execute("COMMIT")
            if step.path.suffix == ".py" and conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # what the step replaced: out of the WAL too
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute("PRAGMA foreign_keys = ON")
        log.info("store schema migrated to version %d", n)
        version = n
    return version


def check_postgres_database(conn: Any) -> None:
    """Refuse a database whose text does not sort by code point (event ids and UTC times are compared as text,
    as SQLite compares them) or that is not UTF-8."""
    row = conn.execute(
        "SELECT datcollate, pg_encoding_to_char(encoding), to_jsonb(d) ->> 'datlocprovider'"
        " FROM pg_database d WHERE datname = current_database()"
    ).fetchone()
    collate, encoding, provider = row[0], row[1], row[2] or "c"  # datlocprovider: PostgreSQL 15 on
    if provider != "c":  # ICU's collations sort by language whatever datcollate says
        collate = "ICU"
    if encoding != "UTF8":
        raise StoreError(f"the PostgreSQL database is in {encoding}: create it with ENCODING 'UTF8' (docs/store.md)")
    if collate not in BYTE_ORDER_COLLATIONS:
        raise StoreError(
            f"the PostgreSQL database sorts text by {collate!r}: create it with LC_COLLATE 'C'"
            " TEMPLATE template0, so ids and times sort as the portal compares them (docs/store.md)"
        )


def _migrate_postgres(conn: Any, upto: int | None) -> int:
    check_postgres_database(conn)
    todo = tuple(s for s in steps(POSTGRESQL) if upto is None or s.version <= upto)
    version = schema_version(conn)
    if version > todo[-1].version:
        raise _too_new(version, POSTGRESQL)
    if version == todo[-1].version:
        return version
    for step in todo:
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATE_LOCK,))  # instances starting together
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL)"
            )
            version = schema_version(conn)  # again, under the lock
            if version >= step.version:
                conn.execute("COMMIT")
                continue
            if version == 0 and not step.baseline and step.version != 1:
                raise StoreError(f"a new PostgreSQL store starts at a baseline, not at step {step.version}")
            if version != 0 and step.baseline:
                raise StoreError(f"the PostgreSQL store is at schema {version}, below its baseline {step.version}")
            if step.path.suffix == ".sql":
                conn.executescript(step.sql())
            else:
                step.function()(conn)
            conn.execute(
                "INSERT INTO schema_version (id, version) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                (step.version,),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info("store schema migrated to version %d", step.version)
        version = step.version
    return version


def bind_key(conn: Any) -> None:
    """Record the connection's store key as the store's (a new store), or refuse a key that is not the store's."""
    key = getattr(conn, "key", None)
    if key is None:
        return
    row = conn.execute("SELECT value FROM store_meta WHERE name = 'store_key'").fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO store_meta (name, value) VALUES ('store_key', ?) ON CONFLICT DO NOTHING", (key.fingerprint,)
        )
        row = conn.execute("SELECT value FROM store_meta WHERE name = 'store_key'").fetchone()
    if row[0] != key.fingerprint:
        raise StoreError(f"the store key {key.fingerprint} is not this store's ({row[0]}): use its own key file")
