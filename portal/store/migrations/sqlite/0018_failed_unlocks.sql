-- 18: a pass (or a remote unlock) granted on paper whose door did not open (door.unlock_failed: the relay did not
-- move, the controller did not answer...) is kept in the access log, result 'failed' and the gateway's reason, so a
-- resident's "my pass did not open the door at 8:05" can be found there; the rows of such events already stored too.
CREATE TRIGGER events_access_failed AFTER INSERT ON events
WHEN NEW.type = 'door.unlock_failed' AND json_valid(NEW.place) AND json_valid(NEW.data)
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
        'failed',
        substr(coalesce(CAST(json_extract(NEW.data, '$.reason') AS TEXT), ''), 1, 32),
        substr(coalesce(CAST(json_extract(NEW.data, '$.reader') AS TEXT), ''), 1, 64),
        substr(coalesce(CAST(json_extract(NEW.data, '$.pass_id') AS TEXT), ''), 1, 64),
        CASE json_extract(NEW.data, '$.kind') WHEN 'remote'
            THEN substr(coalesce(CAST(json_extract(NEW.data, '$.subject') AS TEXT), ''), 1, 64) ELSE '' END,
        substr(coalesce(CAST(json_extract(NEW.data, '$.detail') AS TEXT), ''), 1, 300))
    ON CONFLICT DO NOTHING;
END;
INSERT INTO access_log (event_pk, event_id, ts, site, gateway, door, building, unit, house, subject, kind,
                        result, reason, reader, pass_id, by_user, note)
SELECT pk, id, ts, site, gateway,
    substr(coalesce(CAST(coalesce(json_extract(place, '$.door'), json_extract(data, '$.door')) AS TEXT), ''), 1, 64),
    substr(coalesce(CAST(json_extract(place, '$.building') AS TEXT), ''), 1, 64),
    substr(coalesce(CAST(json_extract(place, '$.unit') AS TEXT), ''), 1, 64),
    substr(coalesce(CAST(json_extract(data, '$.house') AS TEXT), ''), 1, 64),
    substr(coalesce(CAST(json_extract(data, '$.subject') AS TEXT), ''), 1, 64),
    substr(coalesce(CAST(json_extract(data, '$.kind') AS TEXT), ''), 1, 16),
    'failed',
    substr(coalesce(CAST(json_extract(data, '$.reason') AS TEXT), ''), 1, 32),
    substr(coalesce(CAST(json_extract(data, '$.reader') AS TEXT), ''), 1, 64),
    substr(coalesce(CAST(json_extract(data, '$.pass_id') AS TEXT), ''), 1, 64),
    CASE json_extract(data, '$.kind') WHEN 'remote'
        THEN substr(coalesce(CAST(json_extract(data, '$.subject') AS TEXT), ''), 1, 64) ELSE '' END,
    substr(coalesce(CAST(json_extract(data, '$.detail') AS TEXT), ''), 1, 300)
FROM events WHERE type = 'door.unlock_failed' AND json_valid(place) AND json_valid(data)
ON CONFLICT DO NOTHING;
