"""The portal's store, on SQLite (one estate, the default) or PostgreSQL (several instances sharing one database).

- :mod:`portal.store.engine`: where the store lives, connections to either engine, the SQL both understand;
- :mod:`portal.store.schema` and ``migrations/``: the schema's numbered steps, one history for both engines;
- :mod:`portal.store.writer`: the running store (one batching writer, one reader) and its core write operations;
- :mod:`portal.store.seqs`: per-gateway sequence tracking;
- :mod:`portal.store.users`: staff accounts and sessions.

Rate limits and sign-in locks held in the store, for instances that share it, are :mod:`portal.web.ratelimit`'s and
:mod:`portal.web.auth`'s (their tables are schema step 15).
The audit chain (:mod:`portal.store.audit`) and retention (:mod:`portal.estate.retention`) stay beside the code that
writes them.
Everything the rest of the portal uses is importable from here.
"""

from portal.store import engine as db
from portal.store.basics import audit_hash, audit_row_text, key_of, now_text, ts_text
from portal.store.engine import Conn, Connection, Postgres, Row, Target, connect
from portal.store.errors import StoreConflict, StoreError
from portal.store.schema import SCHEMA_VERSION, bind_key, migrate, schema_version
from portal.store.seqs import GatewaySnapshot, GatewayState, add_seq, missing_ranges
from portal.store.users import (
    ROLES,
    Session,
    SitesError,
    User,
    count_admins,
    count_users,
    get_session,
    get_user,
    insert_user,
    list_users,
    parse_sites,
    registry_site_codes,
    set_user_sites,
)
from portal.store.writer import (
    EVENT_COLUMNS,
    MISSED,
    BatchResult,
    CountRejection,
    EnsureGateways,
    EventQuery,
    FnOp,
    Notice,
    Op,
    PeerCommit,
    SetStatus,
    StatusResult,
    Store,
    StoreBatch,
    Tx,
    event_dict,
    load_rejections,
    open_db,
    query_events,
    shutdown_executor,
)

__all__ = [
    "EVENT_COLUMNS",
    "MISSED",
    "ROLES",
    "SCHEMA_VERSION",
    "BatchResult",
    "Conn",
    "Connection",
    "CountRejection",
    "EnsureGateways",
    "EventQuery",
    "FnOp",
    "GatewaySnapshot",
    "GatewayState",
    "Notice",
    "Op",
    "PeerCommit",
    "Postgres",
    "Row",
    "Session",
    "SetStatus",
    "SitesError",
    "StatusResult",
    "Store",
    "StoreBatch",
    "StoreConflict",
    "StoreError",
    "Target",
    "Tx",
    "User",
    "add_seq",
    "audit_hash",
    "audit_row_text",
    "bind_key",
    "connect",
    "count_admins",
    "count_users",
    "db",
    "event_dict",
    "get_session",
    "get_user",
    "insert_user",
    "key_of",
    "list_users",
    "load_rejections",
    "migrate",
    "missing_ranges",
    "now_text",
    "open_db",
    "parse_sites",
    "query_events",
    "registry_site_codes",
    "schema_version",
    "set_user_sites",
    "shutdown_executor",
    "ts_text",
]
