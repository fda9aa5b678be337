-- 2: the estate registry (sites → buildings → units → houses; people and their residencies), doors and the
-- gateways that own them, door plates, resident sessions, visitor passes, the revocation list's version,
-- residents' help calls and problem reports (work items), and the audit trail of personal data.
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
