-- 14: care for residents living alone (portal/care) and guard patrols (portal/patrol).
-- care_households: a flat watched for its residents' wellbeing, with the consent (who, how, when), the named
-- contact and the rules' settings; watch_from is when the no-activity clock last restarted (enrolment, activity
-- attributable to the household, a "我很好", a closed alert). care_people: who is cared for (their own passes and
-- phone unlocks count as activity; another household member's do not). care_alerts: every alert a rule raised,
-- with the incident it leads to (incident_key) and, when the resident said "我很好", who and when. care_feed: the
-- events.pk cursor up to which events were looked at for activity (history from before does not count).
-- patrol_checkpoints: QR plates (a random code, looked up by its SHA-256 and kept only sealed, like door plates)
-- placed on the site map; patrol_routes and their points: rounds every every_min minutes from starts to ends
-- (site-local), each checkpoint on time within window_min of the round's start, late up to late_min more, else
-- missed;
-- patrol_rounds: each round as it was when it began (its points), its state and alert; patrol_scans: every scan
-- from a guard's phone (nonce: the scan page's one-time token, so a replayed request is refused);
-- patrol_visits: a scan counted for a round.
CREATE TABLE care_households (
    id INTEGER PRIMARY KEY,
    house_id INTEGER NOT NULL REFERENCES reg_houses(id),
    site TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'ended')),
    hours INTEGER NOT NULL DEFAULT 24 CHECK (hours BETWEEN 1 AND 168),
    night_watch INTEGER NOT NULL DEFAULT 1,
    night_from TEXT NOT NULL DEFAULT '00:00',   -- site-local
    night_to TEXT NOT NULL DEFAULT '05:00',
    contact_name TEXT NOT NULL,
    contact_relation TEXT NOT NULL DEFAULT '',
    contact_phone TEXT NOT NULL,
    consent_by TEXT NOT NULL,
    consent_how TEXT NOT NULL CHECK (consent_how IN ('resident_phone', 'written', 'in_person', 'phone_call')),
    consent_at TEXT NOT NULL,
    consent_note TEXT NOT NULL DEFAULT '',
    enrolled_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    ended_at TEXT,
    ended_by TEXT,
    watch_from TEXT NOT NULL,
    last_activity_at TEXT,
    last_activity TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX care_households_house ON care_households(house_id) WHERE status = 'active';
CREATE INDEX care_households_site ON care_households(site, status);
CREATE TABLE care_people (
    care_id INTEGER NOT NULL REFERENCES care_households(id),
    person_id INTEGER NOT NULL REFERENCES reg_people(id),
    PRIMARY KEY (care_id, person_id)
) WITHOUT ROWID;
CREATE INDEX care_people_person ON care_people(person_id);
CREATE TABLE care_alerts (
    id INTEGER PRIMARY KEY,
    care_id INTEGER NOT NULL REFERENCES care_households(id),
    rule TEXT NOT NULL CHECK (rule IN ('no_activity', 'night_activity', 'panel_inactive', 'panic')),
    event_id TEXT NOT NULL,
    incident_key TEXT NOT NULL,
    raised_at TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}',
    cleared_at TEXT,
    cleared_by TEXT
);
CREATE INDEX care_alerts_care ON care_alerts(care_id, id);
CREATE UNIQUE INDEX care_alerts_event ON care_alerts(event_id, rule);
CREATE TABLE care_feed (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_pk INTEGER NOT NULL
);
INSERT INTO care_feed (id, last_pk) SELECT 1, coalesce(max(pk), 0) FROM events;

CREATE TABLE patrol_checkpoints (
    id INTEGER PRIMARY KEY,
    site TEXT NOT NULL,
    name TEXT NOT NULL,
    code_hash TEXT NOT NULL UNIQUE,
    sealed BLOB,                         -- the code sealed with the store key (like plates'); NULL once withdrawn
    x REAL,
    y REAL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    withdrawn_at TEXT
);
CREATE UNIQUE INDEX patrol_checkpoints_name ON patrol_checkpoints(site, name) WHERE withdrawn_at IS NULL;
CREATE TABLE patrol_routes (
    id INTEGER PRIMARY KEY,
    site TEXT NOT NULL,
    name TEXT NOT NULL,
    starts TEXT NOT NULL,
    ends TEXT NOT NULL,
    every_min INTEGER NOT NULL CHECK (every_min BETWEEN 10 AND 1440),
    window_min INTEGER NOT NULL CHECK (window_min BETWEEN 1 AND 1440),
    late_min INTEGER NOT NULL CHECK (late_min BETWEEN 0 AND 1440),
    ordered INTEGER NOT NULL DEFAULT 0,
    guard TEXT NOT NULL DEFAULT '',
    active INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (site, name)
);
CREATE TABLE patrol_route_points (
    route_id INTEGER NOT NULL REFERENCES patrol_routes(id),
    position INTEGER NOT NULL,
    checkpoint_id INTEGER NOT NULL REFERENCES patrol_checkpoints(id),
    PRIMARY KEY (route_id, position)
) WITHOUT ROWID;
CREATE TABLE patrol_rounds (
    route_id INTEGER NOT NULL REFERENCES patrol_routes(id),
    round_at TEXT NOT NULL,
    shift_day TEXT NOT NULL,
    due_at TEXT NOT NULL,
    late_at TEXT NOT NULL,
    points TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'overdue', 'done')),
    alert_event TEXT,
    missed TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (route_id, round_at)
) WITHOUT ROWID;
CREATE INDEX patrol_rounds_open ON patrol_rounds(state, late_at) WHERE state != 'done';
CREATE INDEX patrol_rounds_day ON patrol_rounds(shift_day);
CREATE TABLE patrol_scans (
    id INTEGER PRIMARY KEY,
    checkpoint_id INTEGER NOT NULL REFERENCES patrol_checkpoints(id),
    site TEXT NOT NULL,
    guard TEXT NOT NULL,
    at TEXT NOT NULL,
    nonce TEXT NOT NULL UNIQUE,
    outcome TEXT NOT NULL CHECK (outcome IN ('counted', 'outside', 'repeat')),
    remote TEXT NOT NULL DEFAULT ''
);
CREATE INDEX patrol_scans_at ON patrol_scans(at);
CREATE TABLE patrol_visits (
    route_id INTEGER NOT NULL,
    round_at TEXT NOT NULL,
    checkpoint_id INTEGER NOT NULL,
    scan_id INTEGER NOT NULL REFERENCES patrol_scans(id),
    guard TEXT NOT NULL,
    at TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('on_time', 'late')),
    in_order INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (route_id, round_at, checkpoint_id),
    FOREIGN KEY (route_id, round_at) REFERENCES patrol_rounds(route_id, round_at)
) WITHOUT ROWID;
