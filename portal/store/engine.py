"""Where the store lives and how SQL reaches it: SQLite (a file: one estate, the default) or PostgreSQL (a server
that several portal instances share).

The portal's SQL is written once, in the subset both engines understand: ``?`` placeholders, ``ON CONFLICT``
instead of ``INSERT OR IGNORE``, ``RETURNING id`` instead of ``lastrowid``, rows read by name or by index. A SQLite
connection is a plain :class:`sqlite3.Connection` (nothing in between, so the embedded default loses no speed).
A PostgreSQL connection is :class:`PgConnection`, a thin facade over psycopg 3 with the same few methods; the only
text it changes is the placeholders, found by :func:`placeholders`, a tokenizer that skips string literals,
quoted identifiers and comments. The rest of what differs is said where it differs, with ``conn.dialect``
(the schema's steps: per-dialect files in ``migrations/``) or with the helpers here (:func:`in_values`,
:func:`for_update`).

On PostgreSQL every write transaction (:meth:`PgConnection.begin`) first takes one transaction-level advisory
lock, so writes from several instances (and the command-line tools) follow one another as they do on SQLite,
where ``BEGIN IMMEDIATE`` takes the database's write lock: ids come in commit order (the incident feed's cursor
never passes a row another instance has not committed yet), the audit chain has no forks, and a gateway's
sequence bookkeeping, read again inside each transaction, is never stale.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sqlite3
import stat
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from portal.store.storekey import StoreKey

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
#: pg_advisory_xact_lock's key for the store's write transactions ("gatehouse" in ASCII, folded into 63 bits)
WRITE_LOCK = int.from_bytes(b"gatehous", "big") >> 1
#: a second key, for schema migrations (several instances starting at once)
MIGRATE_LOCK = WRITE_LOCK - 1
#: the first of the two int4 keys of a gateway's own lock (the second is :func:`gateway_lock_key`); advisory locks
#: of two int4 keys are a key space apart from those of one bigint key
GATEWAY_LOCK_CLASS = int.from_bytes(b"GHgw", "big") - 2**31


class PgError(Exception):
    """An error from PostgreSQL (psycopg's, as the cause), as the portal catches them."""

    sqlstate: str | None = None


class PgIntegrityError(PgError):
    """A uniqueness, foreign-key, check or not-null rule broken (SQLSTATE class 23)."""


class PgOperationalError(PgError):
    """The server went away, a lock or statement timed out, a transaction was cancelled (class 08, 40, 53-58)."""


# What the portal catches, whichever engine raised it.
Error: tuple[type[Exception], ...] = (sqlite3.Error, PgError)
IntegrityError: tuple[type[Exception], ...] = (sqlite3.IntegrityError, PgIntegrityError)
OperationalError: tuple[type[Exception], ...] = (sqlite3.OperationalError, PgOperationalError)


class Row(Protocol):
    def __getitem__(self, key: int | str, /) -> Any: ...
    def keys(self) -> list[str]: ...
    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...


class Conn(Protocol):
    """What the portal's SQL code may use of a connection (both :class:`Connection` and :class:`PgConnection`)."""

    dialect: str
    shared: bool  # several processes write to this store at once (PostgreSQL)
    key: StoreKey | None

    @property
    def in_transaction(self) -> bool: ...
    def execute(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any] = ..., /) -> Any: ...
    def executemany(self, sql: str, seq: Iterable[Sequence[Any]], /) -> Any: ...
    def begin(self) -> None: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------- where the store is


@dataclass(frozen=True, slots=True)
class Postgres:
    """A PostgreSQL store: a libpq connection string without a password (that is in ``passfile``, libpq's pgpass
    format, mode 0600; or in the PGPASSFILE/~/.pgpass that libpq reads by itself)."""

    dsn: str
    passfile: Path | None = None

    def __str__(self) -> str:
        return f"postgresql store ({self.dsn})"


Target = Path | Postgres


def check_dsn(dsn: str) -> str | None:
    """What is wrong with a connection string for the config (None: nothing): unreadable, or holding a password."""
    from psycopg import conninfo

    try:
        params = conninfo.conninfo_to_dict(dsn)
    except Exception as e:  # psycopg.ProgrammingError: unparsable
        return f"not a libpq connection string: {e}"
    if params.get("password"):
        return "holds a password: put it in store.passfile (mode 0600) instead, never in the config"
    if not params.get("dbname"):
        return "names no database (dbname=...)"
    return None


# ---------------------------------------------------------------- SQLite


class Connection(sqlite3.Connection):
    """A SQLite store connection; ``key`` is the store key (None for tools that only read what is not sealed)."""

    key: StoreKey | None = None
    dialect = SQLITE
    shared = False

    def begin(self, gateways: Iterable[tuple[str, str]] | None = None) -> None:
        """Start a write transaction: the database's write lock, taken now rather than at the first write (one
        process writes to a SQLite store: ``gateways``, PostgreSQL's finer scope, changes nothing here)."""
        self.execute("BEGIN IMMEDIATE")


def _greatest(*args: Any) -> Any:
    present = [a for a in args if a is not None]
    return max(present) if present else None


def _least(*args: Any) -> Any:
    present = [a for a in args if a is not None]
    return min(present) if present else None


def connect_sqlite(path: Path, *, readonly: bool = False, key: StoreKey | None = None) -> Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0, factory=Connection)
    conn.key = key
    conn.row_factory = sqlite3.Row
    # PostgreSQL's names for the larger and smaller of values (NULLs ignored), which SQLite writes max(a, b)
    conn.create_function("greatest", -1, _greatest, deterministic=True)
    conn.create_function("least", -1, _least, deterministic=True)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: an event acknowledged to a gateway is on disk even after a power cut.
        conn.execute("PRAGMA synchronous = FULL")
    return conn


# ---------------------------------------------------------------- PostgreSQL


_TOKEN = re.compile(
    r"""
      (?P<estr>(?<![\w$])[eE]'(?:[^'\\]|\\.|'')*')  # E'it\'s': backslash escapes
    | (?P<str>'(?:[^']|'')*')               # 'it''s'
    | (?P<ident>"(?:[^"]|"")*")             # "quoted identifier"
    | (?P<line>--[^\n]*)                    # -- comment
    | (?P<block>/\*.*?\*/)                  # /* comment */
    | (?P<dollar>\$(?P<tag>[A-Za-z_]\w*)?\$.*?\$(?P=tag)?\$)  # $$ body $$, $fn$ body $fn$
    | (?P<qmark>\?)
    | (?P<pct>%)
    """,
    re.VERBOSE | re.DOTALL,
)


@functools.lru_cache(maxsize=2048)
def placeholders(sql: str, binary: frozenset[int] = frozenset()) -> tuple[str, int]:
    """``?`` placeholders as psycopg's ``%s`` (``%b``, sent in binary, for the n-th one where n is in ``binary``),
    and ``%`` doubled as psycopg reads it, outside string literals, quoted identifiers, comments and dollar-quoted
    bodies; returns (the text, the number of placeholders). An unterminated literal or comment is left as it is,
    for the server to refuse with its own message."""
    out: list[str] = []
    n = 0
    pos = 0
    for m in _TOKEN.finditer(sql):
        out.append(sql[pos : m.start()])
        kind = m.lastgroup if m.lastgroup != "tag" else "dollar"
        if kind == "qmark":
            out.append("%b" if n in binary else "%s")
            n += 1
        elif kind == "pct":
            out.append("%%")
        else:
            out.append(m.group().replace("%", "%%"))
        pos = m.end()
    out.append(sql[pos:])
    return "".join(out), n


class PgRow(Sequence[Any]):
    """A row read by index or by column name, like :class:`sqlite3.Row`."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = tuple(values)
        self._index = index

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._index[key]]
            except KeyError:
                raise IndexError(f"no such column: {key}") from None
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PgRow):
            return self._values == other._values and self._index == other._index
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values)

    def keys(self) -> list[str]:
        return list(self._index)

    def __repr__(self) -> str:
        return f"PgRow({dict(zip(self._index, self._values, strict=True))!r})"


def _row_factory(cursor: Any) -> Any:
    desc = cursor.description or ()
    index = {d.name: i for i, d in enumerate(desc)}

    def make(values: Sequence[Any]) -> PgRow:
        return PgRow(values, index)

    return make


def _translate(e: Exception) -> PgError:
    import psycopg

    state = getattr(e, "sqlstate", None) or ""
    if isinstance(e, psycopg.errors.IntegrityError):
        cls: type[PgError] = PgIntegrityError
    elif isinstance(e, psycopg.OperationalError) or state[:2] in ("08", "40", "53", "54", "55", "57", "58"):
        cls = PgOperationalError
    else:
        cls = PgError
    err = cls(str(e).strip())
    err.sqlstate = state or None
    return err


class PgConnection:
    """A PostgreSQL store connection with the methods the portal uses of :class:`sqlite3.Connection`.

    It runs in autocommit mode, as the SQLite connections do (``isolation_level=None``): a statement outside
    :meth:`begin` ... ``COMMIT`` commits by itself.
    """

    dialect = POSTGRESQL
    shared = True

    def __init__(self, raw: Any, key: StoreKey | None = None) -> None:
        self.raw = raw
        self.key = key

    @property
    def broken(self) -> bool:
        """The server closed the connection (a restart, a fail-over): connect again."""
        return bool(self.raw.closed or self.raw.broken)

    @property
    def in_transaction(self) -> bool:
        from psycopg import pq

        return bool(self.raw.info.transaction_status != pq.TransactionStatus.IDLE)

    def execute(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any] = (), /) -> Any:
        # a list goes as an array in binary: in text, psycopg quotes and escapes each element in Python (a regex
        # per string), which was most of the time a batch's events (12 arrays of JSON and text) took to send
        lists = (
            frozenset(i for i, p in enumerate(parameters) if isinstance(p, list))
            if isinstance(parameters, list | tuple)
            else frozenset()
        )
        text, n = placeholders(sql, lists)
        import psycopg

        try:
            if n == 0 and not parameters:
                return self.raw.execute(sql)  # no placeholders: psycopg reads no % either
            return self.raw.execute(text, parameters)
        except psycopg.Error as e:
            raise _translate(e) from e

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]], /) -> Any:
        import psycopg

        cur = self.raw.cursor()
        try:
            cur.executemany(placeholders(sql)[0], list(seq))
        except psycopg.Error as e:
            raise _translate(e) from e
        return cur

    def executescript(self, sql: str) -> None:
        """Several statements in one string (a schema step); no parameters."""
        self.execute(sql)

    def begin(self, gateways: Iterable[tuple[str, str]] | None = None) -> None:
        """Start a write transaction and take the store's write lock (see the module docstring).

        ``gateways``: the transaction writes nothing but these gateways' rows and rows no other transaction reads
        under the lock (events by their unique id, counters updated in one statement): it takes the write lock in
        its shared form and then each gateway's own lock, in one order, so batches of different gateways commit
        side by side while everything else (the incident feed's cursor over ``events.pk`` above all) still waits
        for all of them and sees every row in commit order."""
        # BEGIN and the lock in one round trip (two statements, no parameters: the simple query protocol)
        fn = "pg_advisory_xact_lock" if gateways is None else "pg_advisory_xact_lock_shared"
        self.execute(f"BEGIN; SELECT {fn}({int(WRITE_LOCK)})")
        if gateways is not None:
            self.lock_gateways(gateways)

    def lock_gateways(self, gateways: Iterable[tuple[str, str]]) -> None:
        """Inside a transaction begun with the shared lock: take these gateways' own locks, in one order (a
        transaction may insert its events first, whose uniqueness needs no lock, and lock its gateways only for
        their bookkeeping)."""
        keys = sorted({gateway_lock_key(s, g) for s, g in gateways})
        if keys:  # unnest yields the keys in the array's order, so every transaction locks them in one order
            self.execute(
                "SELECT count(pg_advisory_xact_lock(?, k)) FROM unnest(?::integer[]) AS k", (GATEWAY_LOCK_CLASS, keys)
            )

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[None]:
        """Statements sent together, their results read at the end (psycopg's pipeline mode): one round trip for
        what needs no answer before the next (a transaction's last writes, its notifications and its COMMIT). A
        statement's error is raised at the end, as a :class:`PgError`; the statements after it did not run."""
        import psycopg

        try:
            with self.raw.pipeline():
                yield
        except psycopg.Error as e:
            raise _translate(e) from e

    def commit(self) -> None:
        if self.in_transaction:
            self.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction:
            self.execute("ROLLBACK")

    def close(self) -> None:
        self.raw.close()


def gateway_lock_key(site: str, gateway: str) -> int:
    """The second key of a gateway's advisory lock: a 32-bit hash of its name (two gateways sharing one only wait
    for each other)."""
    return zlib.crc32(f"{site}/{gateway}".encode()) - 2**31


def _passfile_ok(path: Path) -> None:
    from portal.store.errors import StoreError

    try:
        st = path.stat()
    except OSError as e:
        raise StoreError(f"store.passfile {path}: {e.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StoreError(
            f"store.passfile {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): chmod 600 {path}"
        )


def connect_args(target: Postgres, connect_timeout: int = 10) -> dict[str, Any]:
    """What the portal adds to a connection string of ``target`` (its passfile checked: mode 0600)."""
    from psycopg import conninfo

    # A server that stops answering (a cable pulled, a fail-over) is noticed within about half a minute instead of
    # a blocked writer: TCP keepalives and a cap on unacknowledged data. What the connection string says wins.
    given = conninfo.conninfo_to_dict(target.dsn)
    defaults: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        "application_name": "gatehouse-portal",
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
    }
    extra = {k: v for k, v in defaults.items() if k not in given}
    if target.passfile is not None:
        _passfile_ok(target.passfile)
        extra["passfile"] = str(target.passfile)
    return extra


def connect_postgres(
    target: Postgres, *, readonly: bool = False, key: StoreKey | None = None, connect_timeout: int = 10
) -> PgConnection:
    import psycopg
    from psycopg.types.numeric import IntDumper

    from portal.store.errors import StoreError

    extra = connect_args(target, connect_timeout)
    try:
        raw = psycopg.connect(target.dsn, autocommit=True, row_factory=_row_factory, **extra)
    except psycopg.Error as e:
        raise StoreError(f"cannot reach the {target}: {str(e).strip()}") from None
    raw.adapters.register_dumper(bool, IntDumper)  # True/False as 1/0 in INTEGER columns, as SQLite stores them
    conn = PgConnection(raw, key)
    try:
        conn.execute("SET TIME ZONE 'UTC'")
        if readonly:
            conn.execute("SET default_transaction_read_only = on")
    except BaseException:
        raw.close()
        raise
    return conn


# ---------------------------------------------------------------- either


def connect(target: Target, *, readonly: bool = False, key: StoreKey | None = None) -> Any:
    """A connection to the store at ``target`` (a SQLite file or a :class:`Postgres`), in autocommit mode."""
    if isinstance(target, Postgres):
        return connect_postgres(target, readonly=readonly, key=key)
    return connect_sqlite(Path(target), readonly=readonly, key=key)


def dialect_of(conn: Any) -> str:
    return getattr(conn, "dialect", SQLITE)


def in_values(conn: Any, column: str) -> str:
    """``column`` is one of the values of a single parameter made by :func:`values`."""
    if dialect_of(conn) == POSTGRESQL:
        return f"{column} = ANY(?)"
    return f"{column} IN (SELECT value FROM json_each(?))"


def values(conn: Any, items: Iterable[Any]) -> Any:
    """The parameter for :func:`in_values`: a JSON array for SQLite, an array for PostgreSQL."""
    if dialect_of(conn) == POSTGRESQL:
        return list(items)
    return json.dumps(list(items))


def json_field(conn: Any, column: str, key: str) -> str:
    """SQL for the text of ``key`` in the JSON object held (as text) in ``column``; ``key`` is a plain name."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise ValueError(f"not a plain JSON key: {key!r}")
    if dialect_of(conn) == POSTGRESQL:
        return f"({column}::jsonb ->> '{key}')"
    return f"json_extract({column}, '$.{key}')"


def has_tables(conn: Any, *names: str) -> bool:
    """Whether the store has all these tables (a registry read defensively, an older store)."""
    if dialect_of(conn) == POSTGRESQL:
        return all(conn.execute("SELECT to_regclass(?)", (n,)).fetchone()[0] is not None for n in names)
    found = {
        r[0]
        for r in conn.execute(
            f"SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ({', '.join('?' * len(names))})", names
        )
    }
    return found == set(names)


def for_update(conn: Any) -> str:
    """`` FOR UPDATE`` where rows can be locked (PostgreSQL); SQLite's write lock covers the whole database."""
    return " FOR UPDATE" if dialect_of(conn) == POSTGRESQL else ""


def begin_read(conn: Any) -> None:
    """Start a read-only transaction that sees one snapshot throughout (SQLite's deferred BEGIN does; PostgreSQL's
    default READ COMMITTED would take a new one at each statement)."""
    if dialect_of(conn) == POSTGRESQL:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    else:
        conn.execute("BEGIN")


def begin(conn: Any) -> None:
    """Start a write transaction on either kind of connection (a plain sqlite3 one too)."""
    if hasattr(conn, "begin"):
        conn.begin()
    else:
        conn.execute("BEGIN IMMEDIATE")
