-- 8: the guard console. incident_keys: every key (gateway incident or event) that leads to an incident, so a
-- zone's repeated trips fold into its open incident (fold_key: the same source, opening type and place;
-- trips: how many). notifications: what was sent about an incident to people outside (portal/notify.py),
-- each delivery with its attempts. stations: guardroom PCs whose browser holds a station cookie; a guard's
-- session there lasts a shift (sessions.station_id) and each sign-on is a shift with its handover.
CREATE TABLE incident_keys (
    key TEXT PRIMARY KEY,
    incident_id INTEGER NOT NULL REFERENCES incidents(id) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX incident_keys_incident ON incident_keys(incident_id);
INSERT INTO incident_keys (key, incident_id) SELECT key, id FROM incidents;
ALTER TABLE incidents ADD COLUMN fold_key TEXT;
ALTER TABLE incidents ADD COLUMN trips INTEGER NOT NULL DEFAULT 1;
CREATE INDEX incidents_fold ON incidents(fold_key, id) WHERE state != 'closed';
CREATE TABLE notifications (
    id INTEGER PRIMARY KEY,
    incident_id INTEGER REFERENCES incidents(id) ON DELETE CASCADE,  -- NULL: a test message
    channel TEXT NOT NULL,               -- the channel's name in the config
    label TEXT NOT NULL,                 -- what people call it ("值班主管群")
    kind TEXT NOT NULL,                  -- wecom | dingtalk | sms | email
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    delivered_at TEXT,
    updated_at TEXT NOT NULL,
    UNIQUE (incident_id, channel)
);
CREATE INDEX notifications_state ON notifications(state, id);
CREATE TABLE stations (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    token_hash TEXT NOT NULL UNIQUE,     -- sha256 of the station cookie
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at TEXT
);
ALTER TABLE sessions ADD COLUMN station_id INTEGER REFERENCES stations(id);
CREATE TABLE station_shifts (
    id INTEGER PRIMARY KEY,
    station_id INTEGER NOT NULL REFERENCES stations(id),
    user_name TEXT NOT NULL,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    ended_how TEXT,                      -- handover | signout | revoked
    handed_to TEXT,
    note TEXT NOT NULL DEFAULT '',       -- the handover note, written by the guard taking over
    open_at_start INTEGER NOT NULL DEFAULT 0,
    open_at_end INTEGER
);
CREATE INDEX station_shifts_station ON station_shifts(station_id, id);
