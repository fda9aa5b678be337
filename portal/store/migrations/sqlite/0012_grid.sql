-- 12: the grid link (portal/grid/, docs/grid.md). incidents.flags: what a guard marked when resolving (damage,
-- police; JSON). grid_cases: one per incident or problem report that went up, under its stable event number,
-- with the platform's status (who, when) and the times the yardstick measures. grid_outbox: each revision of
-- a case's record, written in the transaction of the change that made it, kept until the platform took it (or
-- rejected it: failed, with the platform's reason, until an administrator sends it again). grid_status_log:
-- every status the platform sent, under its callback id, so a callback that comes twice is applied once.
ALTER TABLE incidents ADD COLUMN flags TEXT NOT NULL DEFAULT '[]';
CREATE TABLE grid_cases (
    id INTEGER PRIMARY KEY,
    number TEXT NOT NULL UNIQUE,         -- the stable event number ("GH-s1-01J...")
    incident_id INTEGER UNIQUE REFERENCES incidents(id) ON DELETE CASCADE,
    work_item_id INTEGER UNIQUE REFERENCES work_items(id) ON DELETE CASCADE,
    site TEXT NOT NULL,
    trigger TEXT NOT NULL,               -- open | close | lasting | forward
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,            -- "system" or the guard who forwarded it
    category TEXT NOT NULL,
    category_name TEXT NOT NULL,
    subcategory TEXT NOT NULL,
    subcategory_name TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1, -- the newest revision queued
    sent_revision INTEGER NOT NULL DEFAULT 0,
    reported_at TEXT,                    -- when the platform first took the record
    platform_case TEXT NOT NULL DEFAULT '',
    status TEXT CHECK (status IS NULL OR status IN ('accepted', 'dispatched', 'handling', 'closed', 'returned')),
    status_at TEXT,                      -- the platform's time of that status
    status_by TEXT NOT NULL DEFAULT '',
    status_note TEXT NOT NULL DEFAULT '',
    accepted_at TEXT,
    closed_at TEXT,
    CHECK ((incident_id IS NULL) != (work_item_id IS NULL))
);
CREATE INDEX grid_cases_created ON grid_cases(created_at);
CREATE TABLE grid_outbox (
    id INTEGER PRIMARY KEY,
    case_id INTEGER NOT NULL REFERENCES grid_cases(id) ON DELETE CASCADE,
    revision INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('report', 'update')),
    body TEXT NOT NULL,                  -- the record (JSON) as built in the transaction that queued it
    created_at TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'superseded', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    sent_at TEXT,
    UNIQUE (case_id, revision)
);
CREATE INDEX grid_outbox_state ON grid_outbox(state, case_id);
CREATE TABLE grid_status_log (
    id INTEGER PRIMARY KEY,
    case_id INTEGER NOT NULL REFERENCES grid_cases(id) ON DELETE CASCADE,
    callback_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    at TEXT NOT NULL,
    by_name TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL,                -- callback | poll
    received_at TEXT NOT NULL
);
CREATE INDEX grid_status_log_case ON grid_status_log(case_id, id);
