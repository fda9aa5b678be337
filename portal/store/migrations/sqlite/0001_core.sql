-- 1: users, sessions, gateways, events, rejection counters
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    role TEXT NOT NULL CHECK (role IN ('admin', 'guard', 'installer')),
    password_hash TEXT NOT NULL,
    must_change INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    password_changed_at TEXT
);
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,            -- sha256 of the cookie value; the value itself is never stored
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf_token TEXT NOT NULL,
    created REAL NOT NULL,               -- unix seconds (wall clock: sessions outlive restarts)
    last_seen REAL NOT NULL
);
CREATE INDEX sessions_user ON sessions(user_id);
CREATE TABLE gateways (
    site TEXT NOT NULL,
    gateway TEXT NOT NULL,
    contiguous_seq INTEGER NOT NULL DEFAULT 0,  -- every seq 1..contiguous_seq is stored
    max_seq INTEGER NOT NULL DEFAULT 0,
    islands TEXT NOT NULL DEFAULT '[]',         -- JSON [[lo, hi], ...]: stored runs above contiguous_seq
    open_gaps TEXT NOT NULL DEFAULT '[]',       -- JSON [[lo, hi], ...]: gaps noticed and not yet filled
    gaps_noticed INTEGER NOT NULL DEFAULT 0,
    gaps_closed INTEGER NOT NULL DEFAULT 0,
    events_stored INTEGER NOT NULL DEFAULT 0,
    last_event_at TEXT,
    status TEXT NOT NULL DEFAULT 'unknown' CHECK (status IN ('online', 'offline', 'unknown')),
    status_ts TEXT,
    status_changed_at TEXT,
    version TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (site, gateway)
) WITHOUT ROWID;
CREATE TABLE events (
    pk INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    site TEXT NOT NULL,
    gateway TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts TEXT NOT NULL,                    -- UTC, fixed width: 2026-01-02T03:04:05.000000Z
    type TEXT NOT NULL,
    device TEXT NOT NULL,
    point TEXT,
    priority INTEGER NOT NULL,
    place TEXT NOT NULL,                 -- JSON object (wire.Place)
    data TEXT NOT NULL,                  -- JSON object
    received_at TEXT NOT NULL,
    UNIQUE (site, gateway, seq)
);
CREATE INDEX events_type ON events(type, id);
CREATE TABLE rejections (
    reason TEXT NOT NULL,
    source TEXT NOT NULL,                -- site/gateway when known, '' otherwise
    count INTEGER NOT NULL,
    first_at TEXT NOT NULL,
    last_at TEXT NOT NULL,
    last_detail TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (reason, source)
) WITHOUT ROWID;
