"""The portal's own SQLite store: versioned migrations, one batching writer thread, one reader thread.

Every write is an :class:`Op` queued on an asyncio queue. One task pumps the queue into a
single-thread executor that owns the write connection; whatever has queued up while the previous
transaction ran is committed in the next one (each op in its own savepoint, so one failing op does
not undo the others). Callers await their op's future; listeners registered with
:meth:`Store.add_commit_listener` see every committed (op, result) pair *after* the commit, which is
when the ingest may acknowledge events to a gateway and the hub may show them.

Reads run on a second connection in a reader thread, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from gateway import wire

log = logging.getLogger("portal.store")

ROLES = ("admin", "guard", "installer")
T = TypeVar("T")

# ---------------------------------------------------------------- schema

MIGRATIONS: list[str] = [
    # 1: users, sessions, gateways, events, rejection counters
    """
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
    """,
    # 2: the estate registry (sites → buildings → units → houses; people and their residencies), doors and the
    # gateways that own them, door plates, resident sessions, visitor passes, the revocation list's version,
    # residents' help calls and problem reports (work items), and the audit trail of personal data.
    """
    CREATE TABLE reg_sites (
        id INTEGER PRIMARY KEY,
        code TEXT NOT NULL UNIQUE,           -- the wire name (passes, events): ASCII
        name TEXT NOT NULL,                  -- 阳光花园
        office_phone TEXT NOT NULL DEFAULT '',
        office_hours TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE reg_buildings (
        id INTEGER PRIMARY KEY,
        site_id INTEGER NOT NULL REFERENCES reg_sites(id),
        code TEXT NOT NULL,                  -- "3" → 3幢
        UNIQUE (site_id, code)
    );
    CREATE TABLE reg_units (
        id INTEGER PRIMARY KEY,
        building_id INTEGER NOT NULL REFERENCES reg_buildings(id),
        code TEXT NOT NULL,                  -- "2" → 2单元
        UNIQUE (building_id, code)
    );
    CREATE TABLE reg_houses (
        id INTEGER PRIMARY KEY,
        unit_id INTEGER NOT NULL REFERENCES reg_units(id),
        code TEXT NOT NULL,                  -- "301" → 301室
        UNIQUE (unit_id, code)
    );
    CREATE TABLE reg_people (
        id INTEGER PRIMARY KEY,
        phone TEXT NOT NULL UNIQUE,          -- digits only: the sign-in name
        name TEXT NOT NULL,
        password_hash TEXT,                  -- argon2id; NULL until set
        otc_hash TEXT,                       -- sha256 of a one-time sign-in code handed out by an admin
        otc_expires REAL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE reg_residents (              -- one person living in one house
        id INTEGER PRIMARY KEY,
        person_id INTEGER NOT NULL REFERENCES reg_people(id),
        house_id INTEGER NOT NULL REFERENCES reg_houses(id),
        subject TEXT NOT NULL UNIQUE,        -- the pass subject ("r:..."): random, never a row number
        role TEXT NOT NULL CHECK (role IN ('owner', 'family', 'tenant')),
        status TEXT NOT NULL CHECK (status IN ('pending', 'active', 'rejected', 'inactive')),
        move_in TEXT,                        -- YYYY-MM-DD, site-local dates
        move_out TEXT,
        lease_end TEXT,
        source TEXT NOT NULL,                -- import, register, admin
        created_at TEXT NOT NULL,
        decided_at TEXT,
        decided_by TEXT,
        ever_active INTEGER NOT NULL DEFAULT 0,
        UNIQUE (person_id, house_id)
    );
    CREATE INDEX reg_residents_house ON reg_residents(house_id, status);
    CREATE TABLE reg_doors (
        id INTEGER PRIMARY KEY,
        site_id INTEGER NOT NULL REFERENCES reg_sites(id),
        gateway TEXT NOT NULL,
        door TEXT NOT NULL,                  -- the door's name in that gateway's config
        unit_id INTEGER REFERENCES reg_units(id),
        gate INTEGER NOT NULL DEFAULT 0,
        label TEXT NOT NULL DEFAULT '',
        UNIQUE (site_id, door)
    );
    CREATE TABLE plates (
        code_hash TEXT PRIMARY KEY,          -- sha256 of the code: looked up by this, never by the code
        code TEXT NOT NULL,                  -- kept to print the plate again
        kind TEXT NOT NULL CHECK (kind IN ('house', 'entrance')),
        house_id INTEGER REFERENCES reg_houses(id),
        unit_id INTEGER REFERENCES reg_units(id),
        created_at TEXT NOT NULL,
        withdrawn_at TEXT,
        CHECK ((kind = 'house') = (house_id IS NOT NULL) AND (kind = 'entrance') = (unit_id IS NOT NULL))
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX plates_house ON plates(house_id) WHERE withdrawn_at IS NULL AND house_id IS NOT NULL;
    CREATE UNIQUE INDEX plates_unit ON plates(unit_id) WHERE withdrawn_at IS NULL AND unit_id IS NOT NULL;
    CREATE TABLE resident_sessions (
        id_hash TEXT PRIMARY KEY,
        person_id INTEGER NOT NULL REFERENCES reg_people(id) ON DELETE CASCADE,
        created REAL NOT NULL,
        last_seen REAL NOT NULL,
        must_set_password INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE visitor_passes (
        id INTEGER PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,     -- sha256 of the share-link token
        resident_id INTEGER NOT NULL REFERENCES reg_residents(id),
        pass_id TEXT NOT NULL,               -- hex
        subject TEXT NOT NULL,
        pass_text TEXT NOT NULL,
        not_before INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        uses INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX visitor_passes_resident ON visitor_passes(resident_id, not_after);
    CREATE TABLE revocation_state (
        site TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        issued_at INTEGER NOT NULL,
        digest TEXT NOT NULL,                -- of the contents, to notice a change
        signed TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE work_items (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('sos', 'problem')),
        house_id INTEGER NOT NULL REFERENCES reg_houses(id),
        event_id TEXT,                       -- the portal-originated event on the console
        category TEXT NOT NULL DEFAULT '',
        text TEXT NOT NULL DEFAULT '',
        photo BLOB,
        photo_type TEXT,
        status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'acknowledged', 'dispatched', 'resolved',
                                                               'closed')),
        notes TEXT NOT NULL DEFAULT '[]',    -- JSON [{at, by, status, note}]
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX work_items_status ON work_items(status, id);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,                 -- "admin:alice", "guard:bob", "resident:<person id>", "public"
        action TEXT NOT NULL,                -- view.house, view.pending, export.csv, approve, ...
        target TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '',
        remote TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_at ON audit(at);
    """,
    # 3: doors (portal/doors.py, access_log.py, visitors.py). door_states and access_log are kept by triggers on
    # events, in the same transaction that stores the event (an event inserted OR IGNORE as a duplicate fires
    # nothing). The newest event time wins, so a late re-send never rolls a door back. door_commands: remote
    # unlocks (the audit of who, when, which door, why) and their answers; guard_visitors: visitors registered
    # at the guardroom, whose passes name only a random subject.
    """
    CREATE TABLE door_states (
        site TEXT NOT NULL,
        door TEXT NOT NULL,
        gateway TEXT NOT NULL,
        building TEXT,
        unit TEXT,
        state TEXT,                          -- closed | open | unlocked | forced | held | offline; NULL: none yet
        state_ts TEXT,
        state_event TEXT,
        tamper INTEGER NOT NULL DEFAULT 0,
        tamper_ts TEXT,
        reader_offline INTEGER NOT NULL DEFAULT 0,
        reader_ts TEXT,
        access_ts TEXT,                      -- the last access decision at this door
        access_event TEXT,
        PRIMARY KEY (site, door)
    ) WITHOUT ROWID;
    CREATE TABLE access_log (
        event_pk INTEGER PRIMARY KEY,        -- events.pk
        event_id TEXT NOT NULL UNIQUE,
        ts TEXT NOT NULL,
        site TEXT NOT NULL,
        gateway TEXT NOT NULL,
        door TEXT NOT NULL,
        building TEXT NOT NULL,
        unit TEXT NOT NULL,
        house TEXT NOT NULL,                 -- the pass's house ("3-2-301"), '' when none
        subject TEXT NOT NULL,               -- the pass's subject ("r:...", "v:..."), '' when none
        kind TEXT NOT NULL,                  -- resident | visitor | remote | ''
        result TEXT NOT NULL,                -- granted | denied
        reason TEXT NOT NULL,                -- why denied; '' when granted
        reader TEXT NOT NULL,
        pass_id TEXT NOT NULL,
        by_user TEXT NOT NULL,               -- remote unlocks: the portal user
        note TEXT NOT NULL                   -- remote: the reason given; denied: the detail
    );
    CREATE INDEX access_log_ts ON access_log(ts);
    CREATE INDEX access_log_door ON access_log(door, ts);
    CREATE INDEX access_log_house ON access_log(house, ts);
    CREATE INDEX access_log_subject ON access_log(subject, ts);
    CREATE TABLE door_commands (
        id TEXT PRIMARY KEY,                 -- the wire.Command id
        site TEXT NOT NULL,
        gateway TEXT NOT NULL,
        door TEXT NOT NULL,
        reason TEXT NOT NULL,
        by_user TEXT NOT NULL,               -- "guard:bob"
        remote TEXT NOT NULL DEFAULT '',
        sent_at TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'opened', 'failed', 'timeout', 'unsent')),
        detail TEXT NOT NULL DEFAULT '',
        answered_at TEXT
    ) WITHOUT ROWID;
    CREATE INDEX door_commands_sent ON door_commands(sent_at);
    CREATE TABLE guard_visitors (
        id INTEGER PRIMARY KEY,
        subject TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        site TEXT NOT NULL,
        building TEXT NOT NULL,
        unit TEXT NOT NULL,
        house TEXT NOT NULL,
        house_id INTEGER,                    -- reg_houses.id when it was registered
        pass_id TEXT NOT NULL,               -- hex
        pass_text TEXT NOT NULL,
        not_before INTEGER NOT NULL,         -- unix seconds
        not_after INTEGER NOT NULL,
        uses INTEGER NOT NULL,
        note TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL
    );
    CREATE INDEX guard_visitors_name ON guard_visitors(name);

    CREATE TRIGGER events_door_state AFTER INSERT ON events
    WHEN NEW.type = 'door.state' AND json_valid(NEW.place) AND json_valid(NEW.data)
        AND json_extract(NEW.data, '$.state') IN ('closed', 'open', 'unlocked', 'forced', 'held', 'offline')
        AND coalesce(json_extract(NEW.place, '$.door'), '') != ''
    BEGIN
        INSERT INTO door_states (site, door, gateway, building, unit, state, state_ts, state_event)
        VALUES (NEW.site, json_extract(NEW.place, '$.door'), NEW.gateway, json_extract(NEW.place, '$.building'),
                json_extract(NEW.place, '$.unit'), json_extract(NEW.data, '$.state'), NEW.ts, NEW.id)
        ON CONFLICT (site, door) DO UPDATE SET gateway = excluded.gateway, state = excluded.state,
            state_ts = excluded.state_ts, state_event = excluded.state_event
        WHERE (excluded.state_ts, excluded.state_event)
            > (coalesce(door_states.state_ts, ''), coalesce(door_states.state_event, ''));
    END;
    CREATE TRIGGER events_door_flags AFTER INSERT ON events
    WHEN NEW.type IN ('door.tamper', 'door.tamper_restore', 'reader.offline', 'reader.online')
        AND json_valid(NEW.place) AND coalesce(json_extract(NEW.place, '$.door'), '') != ''
    BEGIN
        INSERT INTO door_states (site, door, gateway, building, unit)
        VALUES (NEW.site, json_extract(NEW.place, '$.door'), NEW.gateway, json_extract(NEW.place, '$.building'),
                json_extract(NEW.place, '$.unit'))
        ON CONFLICT (site, door) DO NOTHING;
        UPDATE door_states SET tamper = (NEW.type = 'door.tamper'), tamper_ts = NEW.ts
        WHERE NEW.type IN ('door.tamper', 'door.tamper_restore') AND site = NEW.site
            AND door = json_extract(NEW.place, '$.door') AND coalesce(tamper_ts, '') <= NEW.ts;
        UPDATE door_states SET reader_offline = (NEW.type = 'reader.offline'), reader_ts = NEW.ts
        WHERE NEW.type IN ('reader.offline', 'reader.online') AND site = NEW.site
            AND door = json_extract(NEW.place, '$.door') AND coalesce(reader_ts, '') <= NEW.ts;
    END;
    CREATE TRIGGER events_access_log AFTER INSERT ON events
    WHEN NEW.type IN ('access.granted', 'access.denied') AND json_valid(NEW.place) AND json_valid(NEW.data)
    BEGIN
        INSERT INTO access_log (event_pk, event_id, ts, site, gateway, door, building, unit, house, subject, kind,
                                result, reason, reader, pass_id, by_user, note)
        VALUES (NEW.pk, NEW.id, NEW.ts, NEW.site, NEW.gateway,
            substr(coalesce(CAST(coalesce(json_extract(NEW.place, '$.door'), json_extract(NEW.data, '$.door'))
                                 AS TEXT), ''), 1, 64),
            substr(coalesce(CAST(json_extract(NEW.place, '$.building') AS TEXT), ''), 1, 64),
            substr(coalesce(CAST(json_extract(NEW.place, '$.unit') AS TEXT), ''), 1, 64),
            substr(coalesce(CAST(json_extract(NEW.data, '$.house') AS TEXT), ''), 1, 64),
            substr(coalesce(CAST(json_extract(NEW.data, '$.subject') AS TEXT), ''), 1, 64),
            substr(coalesce(CAST(json_extract(NEW.data, '$.kind') AS TEXT), ''), 1, 16),
            CASE NEW.type WHEN 'access.granted' THEN 'granted' ELSE 'denied' END,
            CASE NEW.type WHEN 'access.granted' THEN ''
                ELSE substr(coalesce(CAST(json_extract(NEW.data, '$.reason') AS TEXT), ''), 1, 32) END,
            substr(coalesce(CAST(coalesce(json_extract(NEW.data, '$.reader'), NEW.point) AS TEXT), ''), 1, 64),
            substr(coalesce(CAST(json_extract(NEW.data, '$.pass_id') AS TEXT), ''), 1, 64),
            substr(coalesce(CAST(json_extract(NEW.data, '$.by') AS TEXT), ''), 1, 64),
            substr(coalesce(CAST(CASE NEW.type WHEN 'access.granted' THEN json_extract(NEW.data, '$.reason')
                                 ELSE json_extract(NEW.data, '$.detail') END AS TEXT), ''), 1, 300))
        ON CONFLICT DO NOTHING;
        INSERT INTO door_states (site, door, gateway, building, unit, access_ts, access_event)
        SELECT NEW.site, json_extract(NEW.place, '$.door'), NEW.gateway, json_extract(NEW.place, '$.building'),
               json_extract(NEW.place, '$.unit'), NEW.ts, NEW.id
        WHERE coalesce(json_extract(NEW.place, '$.door'), '') != ''
        ON CONFLICT (site, door) DO UPDATE SET access_ts = excluded.access_ts, access_event = excluded.access_event
        WHERE (excluded.access_ts, excluded.access_event)
            > (coalesce(door_states.access_ts, ''), coalesce(door_states.access_event, ''));
    END;
    CREATE TRIGGER events_door_command_result AFTER INSERT ON events
    WHEN NEW.type = 'command.result' AND json_valid(NEW.data)
    BEGIN
        UPDATE door_commands SET
            status = CASE WHEN json_type(NEW.data, '$.ok') = 'true' THEN 'opened' ELSE 'failed' END,
            detail = substr(coalesce(CAST(json_extract(NEW.data, '$.detail') AS TEXT), ''), 1, 300),
            answered_at = NEW.ts
        WHERE id = json_extract(NEW.data, '$.command_id') AND site = NEW.site AND gateway = NEW.gateway
            AND status IN ('pending', 'timeout');
    END;

    -- what is stored already
    INSERT INTO access_log (event_pk, event_id, ts, site, gateway, door, building, unit, house, subject, kind,
                            result, reason, reader, pass_id, by_user, note)
    SELECT pk, id, ts, site, gateway,
        substr(coalesce(CAST(coalesce(json_extract(place, '$.door'), json_extract(data, '$.door')) AS TEXT), ''),
               1, 64),
        substr(coalesce(CAST(json_extract(place, '$.building') AS TEXT), ''), 1, 64),
        substr(coalesce(CAST(json_extract(place, '$.unit') AS TEXT), ''), 1, 64),
        substr(coalesce(CAST(json_extract(data, '$.house') AS TEXT), ''), 1, 64),
        substr(coalesce(CAST(json_extract(data, '$.subject') AS TEXT), ''), 1, 64),
        substr(coalesce(CAST(json_extract(data, '$.kind') AS TEXT), ''), 1, 16),
        CASE type WHEN 'access.granted' THEN 'granted' ELSE 'denied' END,
        CASE type WHEN 'access.granted' THEN ''
            ELSE substr(coalesce(CAST(json_extract(data, '$.reason') AS TEXT), ''), 1, 32) END,
        substr(coalesce(CAST(coalesce(json_extract(data, '$.reader'), point) AS TEXT), ''), 1, 64),
        substr(coalesce(CAST(json_extract(data, '$.pass_id') AS TEXT), ''), 1, 64),
        substr(coalesce(CAST(json_extract(data, '$.by') AS TEXT), ''), 1, 64),
        substr(coalesce(CAST(CASE type WHEN 'access.granted' THEN json_extract(data, '$.reason')
                             ELSE json_extract(data, '$.detail') END AS TEXT), ''), 1, 300)
    FROM events WHERE type IN ('access.granted', 'access.denied') AND json_valid(place) AND json_valid(data);
    INSERT INTO door_states (site, door, gateway, building, unit, state, state_ts, state_event)
    SELECT site, json_extract(place, '$.door'), gateway, json_extract(place, '$.building'),
           json_extract(place, '$.unit'), json_extract(data, '$.state'), ts, id
    FROM events WHERE type = 'door.state' AND json_valid(place) AND json_valid(data)
        AND json_extract(data, '$.state') IN ('closed', 'open', 'unlocked', 'forced', 'held', 'offline')
        AND coalesce(json_extract(place, '$.door'), '') != ''
    ORDER BY ts, id
    ON CONFLICT (site, door) DO UPDATE SET gateway = excluded.gateway, state = excluded.state,
        state_ts = excluded.state_ts, state_event = excluded.state_event;
    INSERT INTO door_states (site, door, gateway, building, unit, access_ts, access_event)
    SELECT site, door, gateway, nullif(building, ''), nullif(unit, ''), ts, event_id FROM access_log WHERE door != ''
    ORDER BY ts, event_pk
    ON CONFLICT (site, door) DO UPDATE SET access_ts = excluded.access_ts, access_event = excluded.access_event;
    """,
    # 4: the alarm board (portal/alarms.py). incidents: one per gateway incident (data.incident) or unpaired alarm
    # event, with its workflow state; incident_log: every step with who and when (gateway events under a unique
    # event id, so a re-sent event is applied once); incident_feed: the events.pk cursor up to which events have
    # been folded in (set to the newest event at migration: history from before does not ring); arm_groups: the
    # arm state of zone groups from group.* events; console_commands: arm/disarm orders from the console (the
    # audit of who, when, what) and their command.result answers.
    """
    CREATE TABLE incidents (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,            -- "<site>/<gateway>/<data.incident>" or "ev:<event id>"
        site TEXT NOT NULL,
        gateway TEXT NOT NULL,
        engine_incident TEXT,                -- the gateway's data.incident (for its ack and clear commands)
        kind TEXT NOT NULL,                  -- fire gas panic medical intrusion fence_cut tamper fault
        type TEXT NOT NULL,                  -- the opening event's type
        priority INTEGER NOT NULL,
        place TEXT NOT NULL,                 -- JSON (wire.Place)
        device TEXT NOT NULL DEFAULT '',
        point TEXT,
        label TEXT NOT NULL DEFAULT '',
        data TEXT NOT NULL DEFAULT '{}',     -- JSON: the opening event's data
        first_event TEXT NOT NULL,
        opened_at TEXT NOT NULL,             -- the event's own time (UTC)
        created_at TEXT NOT NULL,            -- when the portal opened it; reports measure from here
        last_event_at TEXT NOT NULL,
        count INTEGER NOT NULL DEFAULT 1,
        restored_at TEXT,
        restore_how TEXT,
        state TEXT NOT NULL DEFAULT 'new' CHECK (state IN ('new', 'acknowledged', 'dispatched', 'on_scene',
                                                            'resolved', 'closed')),
        owner TEXT,                          -- the user who acknowledged it
        acknowledged_at TEXT,
        dispatched_to TEXT,
        dispatched_at TEXT,
        dispatched_by TEXT,
        on_scene_at TEXT,
        cause TEXT CHECK (cause IS NULL OR cause IN ('real', 'false', 'test', 'device_fault', 'unknown')),
        resolved_at TEXT,
        resolved_by TEXT,
        closed_at TEXT,
        closed_by TEXT,
        escalated_at TEXT,
        checks TEXT NOT NULL DEFAULT '{}',   -- JSON {"<step>": {"by": ..., "at": ...}}
        version INTEGER NOT NULL DEFAULT 1,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX incidents_open ON incidents(state, priority) WHERE state != 'closed';
    CREATE INDEX incidents_created ON incidents(created_at);
    CREATE TABLE incident_log (
        id INTEGER PRIMARY KEY,
        incident_id INTEGER NOT NULL REFERENCES incidents(id),
        at TEXT NOT NULL,
        actor TEXT NOT NULL,                 -- a user name, "gateway:<name>" or "system"
        action TEXT NOT NULL,                -- alarm repeat restore ack dispatch on_scene note check uncheck resolve
                                             -- close escalate
        detail TEXT NOT NULL DEFAULT '',
        event_id TEXT
    );
    CREATE INDEX incident_log_incident ON incident_log(incident_id, id);
    CREATE UNIQUE INDEX incident_log_event ON incident_log(event_id) WHERE event_id IS NOT NULL;
    CREATE TABLE incident_feed (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        last_pk INTEGER NOT NULL
    );
    INSERT INTO incident_feed (id, last_pk) SELECT 1, coalesce(max(pk), 0) FROM events;
    CREATE TABLE arm_groups (
        site TEXT NOT NULL,
        gateway TEXT NOT NULL,
        grp TEXT NOT NULL,
        label TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL CHECK (state IN ('armed', 'arming', 'disarmed')),
        mode TEXT,
        by_user TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL DEFAULT '',
        at TEXT NOT NULL,
        event_id TEXT NOT NULL,
        PRIMARY KEY (site, gateway, grp)
    ) WITHOUT ROWID;
    CREATE TABLE console_commands (
        id TEXT PRIMARY KEY,                 -- the wire.Command id
        site TEXT NOT NULL,
        gateway TEXT NOT NULL,
        type TEXT NOT NULL,                  -- arm | disarm
        args TEXT NOT NULL,                  -- JSON
        by_user TEXT NOT NULL,
        sent_at TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('sending', 'sent', 'unsent', 'ok', 'failed')),
        detail TEXT NOT NULL DEFAULT '',
        result_at TEXT,
        result_event TEXT
    ) WITHOUT ROWID;
    CREATE INDEX console_commands_sent ON console_commands(sent_at);
    """,
    # 5: the audit trail as a hash chain (portal/audit.py): each row's hash is audit_hash(prev_hash, its fields),
    # prev_hash the row before's hash ('' for the first). audit_anchor holds the newest row's id and hash and the
    # row count, updated in the same transaction as every insert, so deleting rows at the end is detected too.
    # Existing rows are chained in id order.
    """
    ALTER TABLE audit ADD COLUMN prev_hash TEXT NOT NULL DEFAULT '';
    ALTER TABLE audit ADD COLUMN hash TEXT NOT NULL DEFAULT '';
    CREATE TABLE audit_anchor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        last_id INTEGER NOT NULL,
        hash TEXT NOT NULL,
        count INTEGER NOT NULL
    );
    WITH RECURSIVE chain (id, prev, h) AS (
        SELECT id, '', audit_hash('', id, at, actor, action, target, detail, remote)
        FROM audit WHERE id = (SELECT min(id) FROM audit)
        UNION ALL
        SELECT a.id, c.h, audit_hash(c.h, a.id, a.at, a.actor, a.action, a.target, a.detail, a.remote)
        FROM chain c JOIN audit a ON a.id = (SELECT min(id) FROM audit WHERE id > c.id)
    )
    UPDATE audit SET prev_hash = chain.prev, hash = chain.h FROM chain WHERE audit.id = chain.id;
    INSERT INTO audit_anchor (id, last_id, hash, count)
    SELECT 1, coalesce(max(id), 0), coalesce((SELECT hash FROM audit ORDER BY id DESC LIMIT 1), ''), count(*)
    FROM audit;
    """,
    # 6: staff accounts scoped to sites. NULL: every site (admins, and single-site estates); otherwise a JSON
    # array of site ids, and the account sees and acts on those sites' alarms, doors and events only.
    """
    ALTER TABLE users ADD COLUMN sites TEXT;
    """,
    # 7: data retention (portal/retention.py). audit_epoch: where the audit chain starts once its oldest rows are
    # pruned (the id and hash of the last pruned row, how many rows were pruned in all); the retention.purge row
    # that planned the pruning is in the kept chain and attests it. reg_people.purged_at: a former resident whose
    # name and phone were anonymised. Indexes for the purge's range deletes.
    """
    CREATE TABLE audit_epoch (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        through_id INTEGER NOT NULL,
        hash TEXT NOT NULL,
        pruned INTEGER NOT NULL,
        at TEXT NOT NULL
    );
    ALTER TABLE reg_people ADD COLUMN purged_at TEXT;
    CREATE INDEX events_ts ON events(ts);
    CREATE INDEX guard_visitors_expiry ON guard_visitors(not_after);
    CREATE INDEX visitor_passes_expiry ON visitor_passes(not_after);
    """,
]


class StoreError(RuntimeError):
    pass


class StoreConflict(StoreError):
    """A write that breaks a uniqueness rule (a user name taken, ...)."""


def ts_text(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_text() -> str:
    return ts_text(datetime.now(UTC))


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: an event acknowledged to a gateway is on disk even after a power cut.
        conn.execute("PRAGMA synchronous = FULL")
    return conn


def audit_hash(prev_hash: str, id: int, at: str, actor: str, action: str, target: str, detail: str,
               remote: str) -> str:
    """SHA-256 (hex) of ``prev_hash`` followed by the audit row's fields as canonical JSON."""
    row = {"id": id, "at": at, "actor": actor, "action": action, "target": target, "detail": detail,
           "remote": remote}
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256((prev_hash + canonical).encode("utf-8", "surrogatepass")).hexdigest()


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; returns the version. Each step is one transaction."""
    conn.create_function("audit_hash", 8, audit_hash, deterministic=True)  # for migration 5's backfill
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > len(MIGRATIONS):
        raise StoreError(f"the store is at schema {version}, newer than this portal ({len(MIGRATIONS)})")
    for n, sql in enumerate(MIGRATIONS[version:], start=version + 1):
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {n};\nCOMMIT;")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info("store schema migrated to version %d", n)
        version = n
    return version


def open_db(path: Path) -> sqlite3.Connection:
    """A migrated write connection, for command-line tools that run beside the portal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    migrate(conn)
    return conn


# ---------------------------------------------------------------- users and sessions (plain SQL)


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str
    role: str
    password_hash: str
    must_change: bool
    created_at: str
    sites: tuple[str, ...] | None = None  # None: every site

    def sees_site(self, site: str) -> bool:
        return self.sites is None or site in self.sites


@dataclass(frozen=True, slots=True)
class Session:
    id_hash: str
    user: User
    csrf_token: str
    created: float
    last_seen: float


def _user(row: sqlite3.Row) -> User:
    sites = row["sites"]
    return User(row["id"], row["name"], row["role"], row["password_hash"], bool(row["must_change"]),
                row["created_at"], None if sites is None else tuple(json.loads(sites)))


def insert_user(conn: sqlite3.Connection, name: str, role: str, password_hash: str, must_change: bool,
                sites: Sequence[str] | None = None) -> int:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    try:
        cur = conn.execute(
            "INSERT INTO users (name, role, password_hash, must_change, created_at, sites) VALUES (?, ?, ?, ?, ?, ?)",
            (name, role, password_hash, int(must_change), now_text(), _sites_json(sites)),
        )
    except sqlite3.IntegrityError:
        raise StoreConflict(f"user {name!r} exists") from None
    return int(cur.lastrowid or 0)


def _sites_json(sites: Sequence[str] | None) -> str | None:
    return None if sites is None else json.dumps(sorted(set(sites)))


def set_user_sites(conn: sqlite3.Connection, name: str, sites: Sequence[str] | None) -> bool:
    """Scope a user to ``sites`` (None: every site); False when there is no such user."""
    cur = conn.execute("UPDATE users SET sites = ? WHERE name = ?", (_sites_json(sites), name))
    return cur.rowcount == 1


class SitesError(ValueError):
    """A bad list of sites; ``key`` is an i18n key, ``sites`` the offending ids."""

    def __init__(self, key: str, sites: Sequence[str] = ()) -> None:
        super().__init__(f"{key}: {', '.join(sites)}")
        self.key = key
        self.sites = tuple(sites)


def parse_sites(raw: str, known: Sequence[str]) -> tuple[str, ...] | None:
    """``north,south`` → ("north", "south"); blank → None (every site). Ids must be wire names, and one of
    ``known`` when the registry knows any sites (an empty registry accepts any, to be filled in later)."""
    parts = [p.strip() for p in raw.replace("，", ",").split(",")]
    ids = tuple(dict.fromkeys(p for p in parts if p))
    if not ids:
        return None
    bad = [i for i in ids if not wire.NAME_RE.match(i)]
    if bad:
        raise SitesError("users.bad_sites", bad)
    unknown = [i for i in ids if known and i not in known]
    if unknown:
        raise SitesError("users.unknown_sites", unknown)
    return ids


def registry_site_codes(conn: sqlite3.Connection) -> list[str]:
    """The site codes the estate registry knows (empty before any import)."""
    return [r[0] for r in conn.execute("SELECT code FROM reg_sites ORDER BY code")]


def get_user(conn: sqlite3.Connection, name: str) -> User | None:
    row = conn.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
    return _user(row) if row else None


def list_users(conn: sqlite3.Connection) -> list[User]:
    return [_user(r) for r in conn.execute("SELECT * FROM users ORDER BY name")]


def count_users(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM users").fetchone()[0])


def count_admins(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM users WHERE role = 'admin'").fetchone()[0])


def get_session(conn: sqlite3.Connection, id_hash: str) -> Session | None:
    row = conn.execute(
        "SELECT s.id_hash, s.csrf_token, s.created, s.last_seen, u.* FROM sessions s JOIN users u ON u.id = s.user_id"
        " WHERE s.id_hash = ?",
        (id_hash,),
    ).fetchone()
    if row is None:
        return None
    return Session(row["id_hash"], _user(row), row["csrf_token"], row["created"], row["last_seen"])


# ---------------------------------------------------------------- gateway sequence tracking


@dataclass(slots=True)
class GatewayState:
    """Per-gateway bookkeeping, owned by the writer thread; :meth:`snapshot` copies it for the loop."""

    site: str
    gateway: str
    contiguous_seq: int = 0
    max_seq: int = 0
    islands: list[list[int]] = field(default_factory=list)
    open_gaps: list[list[int]] = field(default_factory=list)
    gaps_noticed: int = 0
    gaps_closed: int = 0
    events_stored: int = 0
    last_event_at: str | None = None
    status: str = "unknown"
    status_ts: str | None = None
    status_changed_at: str | None = None
    version: str = ""

    def snapshot(self) -> GatewaySnapshot:
        return GatewaySnapshot(
            site=self.site, gateway=self.gateway, contiguous_seq=self.contiguous_seq, max_seq=self.max_seq,
            missing=tuple((lo, hi) for lo, hi in missing_ranges(self.contiguous_seq, self.islands)),
            open_gaps=tuple((lo, hi) for lo, hi in self.open_gaps), gaps_noticed=self.gaps_noticed,
            gaps_closed=self.gaps_closed, events_stored=self.events_stored, last_event_at=self.last_event_at,
            status=self.status, status_changed_at=self.status_changed_at, version=self.version,
        )

    def copy(self) -> GatewayState:
        return GatewayState(
            self.site, self.gateway, self.contiguous_seq, self.max_seq, [list(i) for i in self.islands],
            [list(g) for g in self.open_gaps], self.gaps_noticed, self.gaps_closed, self.events_stored,
            self.last_event_at, self.status, self.status_ts, self.status_changed_at, self.version,
        )


@dataclass(frozen=True, slots=True)
class GatewaySnapshot:
    site: str
    gateway: str
    contiguous_seq: int
    max_seq: int
    missing: tuple[tuple[int, int], ...]
    open_gaps: tuple[tuple[int, int], ...]
    gaps_noticed: int
    gaps_closed: int
    events_stored: int
    last_event_at: str | None
    status: str
    status_changed_at: str | None
    version: str


def missing_ranges(contiguous: int, islands: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    out = []
    prev = contiguous
    for lo, hi in islands:
        if lo > prev + 1:
            out.append((prev + 1, lo - 1))
        prev = hi
    return out


def add_seq(st: GatewayState, seq: int) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """Record a newly stored seq. Returns (the gap it opened or None, the gaps it closed)."""
    opened: tuple[int, int] | None = None
    if seq > st.max_seq + 1:
        opened = (st.max_seq + 1, seq - 1)
        st.open_gaps.append([opened[0], opened[1]])
        st.gaps_noticed += 1
    st.max_seq = max(st.max_seq, seq)
    if seq <= st.contiguous_seq:
        return opened, []
    isl = st.islands
    i = bisect.bisect_left(isl, [seq, seq])
    if i > 0 and isl[i - 1][1] >= seq - 1:  # touches or overlaps the run before
        i -= 1
        isl[i][1] = max(isl[i][1], seq)
    else:
        isl.insert(i, [seq, seq])
    while i + 1 < len(isl) and isl[i + 1][0] <= isl[i][1] + 1:  # merge runs that now touch
        isl[i][1] = max(isl[i][1], isl.pop(i + 1)[1])
    while isl and isl[0][0] <= st.contiguous_seq + 1:
        st.contiguous_seq = max(st.contiguous_seq, isl.pop(0)[1])
    closed: list[tuple[int, int]] = []
    if st.open_gaps:
        holes = missing_ranges(st.contiguous_seq, isl)
        still = []
        for lo, hi in st.open_gaps:
            if any(h_lo <= hi and lo <= h_hi for h_lo, h_hi in holes):
                still.append([lo, hi])
            else:
                closed.append((lo, hi))
        st.open_gaps = still
        st.gaps_closed += len(closed)
    return opened, closed


# ---------------------------------------------------------------- write operations


class Tx:
    """What an op sees inside the writer thread: the connection and the gateway states."""

    def __init__(self, conn: sqlite3.Connection, gateways: dict[tuple[str, str], GatewayState]) -> None:
        self.conn = conn
        self.gateways = gateways

    def gateway(self, site: str, gateway: str) -> GatewayState:
        key = (site, gateway)
        st = self.gateways.get(key)
        if st is None:
            self.conn.execute("INSERT OR IGNORE INTO gateways (site, gateway) VALUES (?, ?)", (site, gateway))
            st = self.gateways[key] = GatewayState(site, gateway)
        return st

    def save_gateway(self, st: GatewayState) -> None:
        self.conn.execute(
            "UPDATE gateways SET contiguous_seq=?, max_seq=?, islands=?, open_gaps=?, gaps_noticed=?, gaps_closed=?,"
            " events_stored=?, last_event_at=?, status=?, status_ts=?, status_changed_at=?, version=?"
            " WHERE site=? AND gateway=?",
            (st.contiguous_seq, st.max_seq, json.dumps(st.islands), json.dumps(st.open_gaps), st.gaps_noticed,
             st.gaps_closed, st.events_stored, st.last_event_at, st.status, st.status_ts, st.status_changed_at,
             st.version, st.site, st.gateway),
        )


class Op:
    """A unit of writing. ``apply`` runs in the writer thread inside a savepoint of a transaction."""

    def apply(self, tx: Tx) -> Any:
        raise TypeError(f"{type(self).__name__} must define apply()")


class FnOp(Op):
    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.fn = fn

    def apply(self, tx: Tx) -> Any:
        return self.fn(tx.conn)


_enc = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class BatchResult:
    site: str
    gateway: str
    ack_seqs: list[int]  # every seq now stored under the same id: new ones and re-sends
    new_events: list[dict[str, Any]]  # as the API shows them
    duplicates: int
    conflicts: list[int]  # seqs stored under a different id: not acknowledged
    gap_opened: list[tuple[int, int]]
    gaps_closed: list[tuple[int, int]]
    snapshot: GatewaySnapshot


class StoreBatch(Op):
    """Store a decoded event batch idempotently (by id) and advance the gateway's seq bookkeeping."""

    def __init__(self, batch: wire.EventBatch) -> None:
        self.batch = batch

    def apply(self, tx: Tx) -> BatchResult:
        b = self.batch
        conn = tx.conn
        received = now_text()
        acks: list[int] = []
        new: list[dict[str, Any]] = []
        conflicts: list[int] = []
        dups = 0
        for ev in b.events:
            place = _enc.encode(ev.place).decode()
            data = _enc.encode(ev.data).decode()
            row = (ev.id, b.site, b.gateway, ev.seq, ts_text(ev.ts), ev.type, ev.device, ev.point, int(ev.priority),
                   place, data, received)
            cur = conn.execute(
                "INSERT OR IGNORE INTO events (id, site, gateway, seq, ts, type, device, point, priority, place,"
                " data, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            if cur.rowcount == 1:
                acks.append(ev.seq)
                new.append(event_dict(row))
                continue
            old = conn.execute("SELECT site, gateway, seq FROM events WHERE id = ?", (ev.id,)).fetchone()
            if old is not None and (old["site"], old["gateway"], old["seq"]) == (b.site, b.gateway, ev.seq):
                acks.append(ev.seq)
                dups += 1
            else:
                conflicts.append(ev.seq)
        st = tx.gateway(b.site, b.gateway).copy()
        opened: list[tuple[int, int]] = []
        closed: list[tuple[int, int]] = []
        for e in new:
            o, c = add_seq(st, e["seq"])
            if o:
                opened.append(o)
            closed.extend(c)
        if new:
            st.events_stored += len(new)
            st.last_event_at = received
            tx.save_gateway(st)
        tx.gateways[(b.site, b.gateway)] = st
        return BatchResult(b.site, b.gateway, acks, new, dups, conflicts, opened, closed, st.snapshot())


@dataclass(frozen=True, slots=True)
class StatusResult:
    changed: bool
    snapshot: GatewaySnapshot


class SetStatus(Op):
    def __init__(self, site: str, gateway: str, status: wire.Status) -> None:
        self.site, self.gateway, self.status = site, gateway, status

    def apply(self, tx: Tx) -> StatusResult:
        st = tx.gateway(self.site, self.gateway).copy()
        changed = st.status != self.status.state
        st.status = self.status.state
        st.status_ts = ts_text(self.status.ts) if self.status.ts else None
        st.version = self.status.version
        if changed:
            st.status_changed_at = now_text()
        tx.save_gateway(st)
        tx.gateways[(self.site, self.gateway)] = st
        return StatusResult(changed, st.snapshot())


class EnsureGateways(Op):
    def __init__(self, keys: Iterable[tuple[str, str]]) -> None:
        self.keys = list(keys)

    def apply(self, tx: Tx) -> list[GatewaySnapshot]:
        return [tx.gateway(s, g).snapshot() for s, g in self.keys]


class CountRejection(Op):
    def __init__(self, reason: str, source: str, detail: str, n: int = 1) -> None:
        self.reason, self.source, self.detail, self.n = reason, source, detail[:300], n

    def apply(self, tx: Tx) -> None:
        at = now_text()
        tx.conn.execute(
            "INSERT INTO rejections (reason, source, count, first_at, last_at, last_detail) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (reason, source) DO UPDATE SET count = count + excluded.count, last_at = excluded.last_at,"
            " last_detail = excluded.last_detail",
            (self.reason, self.source, self.n, at, at, self.detail),
        )


EVENT_COLUMNS = ("id", "site", "gateway", "seq", "ts", "type", "device", "point", "priority", "place", "data",
                 "received_at")


def event_dict(row: Sequence[Any] | sqlite3.Row) -> dict[str, Any]:
    d = dict(zip(EVENT_COLUMNS, tuple(row), strict=True)) if not isinstance(row, sqlite3.Row) else {
        k: row[k] for k in EVENT_COLUMNS}
    d["place"] = json.loads(d["place"])
    d["data"] = json.loads(d["data"])
    return d


# ---------------------------------------------------------------- reads


@dataclass(frozen=True, slots=True)
class EventQuery:
    before: str | None = None  # event id: newer-first page of older events
    after: str | None = None  # event id: older-first page of newer events
    after_seq: int | None = None  # with gateway: that gateway's events above this seq, by seq
    site: str | None = None
    gateway: str | None = None
    types: tuple[str, ...] = ()
    limit: int = 100
    sites: tuple[str, ...] | None = None  # only these sites (a user's scope); None: every site


def query_events(conn: sqlite3.Connection, q: EventQuery) -> list[dict[str, Any]]:
    where: list[str] = []
    args: list[Any] = []
    if q.sites is not None:
        where.append(f"site IN ({', '.join('?' * len(q.sites))})" if q.sites else "0 = 1")
        args.extend(q.sites)
    if q.site:
        where.append("site = ?")
        args.append(q.site)
    if q.gateway:
        where.append("gateway = ?")
        args.append(q.gateway)
    if q.types:
        where.append(f"type IN ({', '.join('?' * len(q.types))})")
        args.extend(q.types)
    if q.after_seq is not None:
        where.append("seq > ?")
        args.append(q.after_seq)
        order = "site, gateway, seq"
    elif q.after is not None:
        where.append("id > ?")
        args.append(q.after)
        order = "id"
    else:
        if q.before is not None:
            where.append("id < ?")
            args.append(q.before)
        order = "id DESC"
    sql = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {order} LIMIT ?"
    args.append(q.limit)
    return [event_dict(r) for r in conn.execute(sql, args)]


def load_rejections(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    return {(r["reason"], r["source"]): int(r["count"]) for r in conn.execute("SELECT * FROM rejections")}


def _load_gateways(conn: sqlite3.Connection) -> dict[tuple[str, str], GatewayState]:
    out = {}
    for r in conn.execute("SELECT * FROM gateways"):
        out[(r["site"], r["gateway"])] = GatewayState(
            r["site"], r["gateway"], r["contiguous_seq"], r["max_seq"], json.loads(r["islands"]),
            json.loads(r["open_gaps"]), r["gaps_noticed"], r["gaps_closed"], r["events_stored"], r["last_event_at"],
            r["status"], r["status_ts"], r["status_changed_at"], r["version"],
        )
    return out


# ---------------------------------------------------------------- the store


async def shutdown_executor(ex: ThreadPoolExecutor, wait_s: float = 5.0) -> None:
    """Shut a thread pool down and wait (off the loop's back) until its threads have ended."""
    ex.shutdown(wait=False, cancel_futures=True)
    threads = list(getattr(ex, "_threads", ()))
    for _ in range(int(wait_s / 0.005)):
        if not any(t.is_alive() for t in threads):
            return
        await asyncio.sleep(0.005)
    log.warning("worker threads %s did not end within %.0f s", [t.name for t in threads if t.is_alive()], wait_s)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark a failure as seen; the writer has logged it

_STOP = object()
CommitListener = Callable[[list[tuple[Op, Any]]], None]


class Store:
    """Open with :meth:`start`, close with :meth:`close` (which commits everything queued first)."""

    def __init__(self, path: Path, *, batch_max: int = 256, queue_max: int = 10_000,
                 observe_commit: Callable[[float], None] | None = None) -> None:
        self.path = Path(path)
        self._observe_commit = observe_commit
        self.batch_max = batch_max
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_max)
        self._wexec: ThreadPoolExecutor | None = None
        self._rexec: ThreadPoolExecutor | None = None
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._states: dict[tuple[str, str], GatewayState] = {}
        self._pump: asyncio.Task[None] | None = None
        self._listeners: list[CommitListener] = []
        self.gateways: dict[tuple[str, str], GatewaySnapshot] = {}  # loop-side copy, for health
        self.ok = False
        self.last_error = ""
        self.commits = 0
        self.last_commit_s = 0.0
        self._closing = False

    # -- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wexec = ThreadPoolExecutor(1, thread_name_prefix="portal.store.writer")
        self._rexec = ThreadPoolExecutor(1, thread_name_prefix="portal.store.reader")
        try:
            await loop.run_in_executor(self._wexec, self._open_writer)
            await loop.run_in_executor(self._rexec, self._open_reader)
        except BaseException:
            await self._shutdown_threads()
            raise
        self.gateways = {k: s.snapshot() for k, s in self._states.items()}
        self.ok = True
        self._pump = asyncio.create_task(self._run_pump(), name="portal.store.writer")

    def _open_writer(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wconn = connect(self.path)
        migrate(self._wconn)
        self._states = _load_gateways(self._wconn)

    def _open_reader(self) -> None:
        self._rconn = connect(self.path, readonly=True)

    async def close(self) -> None:
        """Commit what is queued, then close both connections and threads."""
        if self._closing:
            return
        self._closing = True
        if self._pump is not None and not self._pump.done():
            await self._queue.put(_STOP)
            try:
                await self._pump
            except Exception:
                log.exception("store writer failed while closing")
        await self._shutdown_threads()
        self.ok = False

    async def _shutdown_threads(self) -> None:
        loop = asyncio.get_running_loop()
        for ex, attr in ((self._wexec, "_wconn"), (self._rexec, "_rconn")):
            if ex is None:
                continue

            def _close(attr: str = attr) -> None:
                conn = getattr(self, attr)
                if conn is not None:
                    conn.close()
                    setattr(self, attr, None)

            try:
                await loop.run_in_executor(ex, _close)
            except Exception:
                log.exception("closing the %s connection failed", attr)
        for ex in (self._wexec, self._rexec):
            if ex is not None:
                await shutdown_executor(ex)
        self._wexec = self._rexec = None

    # -- writing

    def add_commit_listener(self, cb: CommitListener) -> None:
        self._listeners.append(cb)

    async def enqueue(self, op: Op) -> asyncio.Future[Any]:
        """Queue an op (waiting only for room in the queue); the future resolves after its commit."""
        if self._closing or self._pump is None:
            raise StoreError("the store is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put((op, fut))
        return fut

    def enqueue_nowait(self, op: Op) -> asyncio.Future[Any] | None:
        """Queue an op from synchronous code; None when the store is closed or its queue is full."""
        if self._closing or self._pump is None:
            return None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((op, fut))
        except asyncio.QueueFull:
            return None
        fut.add_done_callback(_consume)
        return fut

    async def write(self, op: Op) -> Any:
        return await (await self.enqueue(op))

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        await self.write(FnOp(lambda c: None))

    async def run_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        result: T = await self.write(FnOp(fn))
        return result

    async def _run_pump(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wexec is not None
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is _STOP:
                break
            items = [first]
            while len(items) < self.batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                items.append(nxt)
            t0 = time.monotonic()
            try:
                results = await loop.run_in_executor(self._wexec, self._commit, [op for op, _ in items])
            except Exception as e:  # a bug in the writer itself: fail these writes, keep the writer alive
                log.exception("store writer failed")
                self.ok = False
                self.last_error = str(e)
                results = [(False, StoreError(f"writer failed: {e}"))] * len(items)
            self.last_commit_s = time.monotonic() - t0
            if self._observe_commit is not None:
                self._observe_commit(self.last_commit_s)
            committed: list[tuple[Op, Any]] = []
            for (op, fut), (ok, value) in zip(items, results, strict=True):
                if ok:
                    committed.append((op, value))
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
            for _op, value in committed:
                snap = getattr(value, "snapshot", None)
                if isinstance(snap, GatewaySnapshot):
                    self.gateways[(snap.site, snap.gateway)] = snap
                elif isinstance(value, list):
                    for s in value:
                        if isinstance(s, GatewaySnapshot):
                            self.gateways[(s.site, s.gateway)] = s
            if committed:
                for cb in self._listeners:
                    try:
                        cb(committed)
                    except Exception:
                        log.exception("a commit listener failed")

    def _commit(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        """Writer thread: one transaction, one savepoint per op."""
        conn = self._wconn
        assert conn is not None
        saved = {k: v for k, v in self._states.items()}
        tx = Tx(conn, self._states)
        out: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in ops:
                before = {k: v for k, v in self._states.items()}
                conn.execute("SAVEPOINT op")
                try:
                    value = op.apply(tx)
                except Exception as e:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    self._states.clear()
                    self._states.update(before)
                    out.append((False, e))
                    if not isinstance(e, StoreConflict | ValueError):
                        log.exception("store op %s failed", type(op).__name__)
                else:
                    conn.execute("RELEASE op")
                    out.append((True, value))
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._states.clear()
            self._states.update(saved)
            if self.ok:
                log.error("store commit failed: %s", e)
            self.ok = False
            self.last_error = str(e)
            err = StoreError(f"commit failed: {e}")
            return [(False, err)] * len(ops)
        if not self.ok and not self._closing:
            log.info("store commits again")
        self.ok = True
        self.last_error = ""
        self.commits += 1
        return out

    # -- reading

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the reader thread's connection."""
        if self._rexec is None:
            raise StoreError("the store is closed")

        def run() -> T:
            assert self._rconn is not None
            return fn(self._rconn)

        return await asyncio.get_running_loop().run_in_executor(self._rexec, run)

    async def events(self, q: EventQuery) -> list[dict[str, Any]]:
        return await self.read(lambda c: query_events(c, q))
