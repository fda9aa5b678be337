-- 4: the alarm board (portal/alarms.py). incidents: one per gateway incident (data.incident) or unpaired alarm
-- event, with its workflow state; incident_log: every step with who and when (gateway events under a unique
-- event id, so a re-sent event is applied once); incident_feed: the events.pk cursor up to which events have
-- been folded in (set to the newest event at migration: history from before does not ring); arm_groups: the
-- arm state of zone groups from group.* events; console_commands: arm/disarm orders from the console (the
-- audit of who, when, what) and their command.result answers.
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
