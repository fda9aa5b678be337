-- 3: doors (portal/doors.py, access_log.py, visitors.py). door_states and access_log are kept by triggers on
-- events, in the same transaction that stores the event (an event inserted OR IGNORE as a duplicate fires
-- nothing). The newest event time wins, so a late re-send never rolls a door back. door_commands: remote
-- unlocks (the audit of who, when, which door, why) and their answers; guard_visitors: visitors registered
-- at the guardroom, whose passes name only a random subject.
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
