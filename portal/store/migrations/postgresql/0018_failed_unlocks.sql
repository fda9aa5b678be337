-- 18: failed unlocks in the access log (the comments are in ../sqlite/0018_failed_unlocks.sql).
CREATE FUNCTION events_access_failed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    p jsonb := NEW.place::jsonb;
    d jsonb := NEW.data::jsonb;
BEGIN
    INSERT INTO access_log (event_pk, event_id, ts, site, gateway, door, building, unit, house, subject, kind,
                            result, reason, reader, pass_id, by_user, note)
    VALUES (NEW.pk, NEW.id, NEW.ts, NEW.site, NEW.gateway,
        substr(coalesce(p ->> 'door', d ->> 'door', ''), 1, 64),
        substr(coalesce(p ->> 'building', ''), 1, 64),
        substr(coalesce(p ->> 'unit', ''), 1, 64),
        substr(coalesce(d ->> 'house', ''), 1, 64),
        substr(coalesce(d ->> 'subject', ''), 1, 64),
        substr(coalesce(d ->> 'kind', ''), 1, 16),
        'failed',
        substr(coalesce(d ->> 'reason', ''), 1, 32),
        substr(coalesce(d ->> 'reader', ''), 1, 64),
        substr(coalesce(d ->> 'pass_id', ''), 1, 64),
        CASE d ->> 'kind' WHEN 'remote' THEN substr(coalesce(d ->> 'subject', ''), 1, 64) ELSE '' END,
        substr(coalesce(d ->> 'detail', ''), 1, 300))
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER events_access_failed AFTER INSERT ON events FOR EACH ROW
WHEN (NEW.type = 'door.unlock_failed')
EXECUTE FUNCTION events_access_failed();
INSERT INTO access_log (event_pk, event_id, ts, site, gateway, door, building, unit, house, subject, kind,
                        result, reason, reader, pass_id, by_user, note)
SELECT pk, id, ts, site, gateway,
    substr(coalesce(place::jsonb ->> 'door', data::jsonb ->> 'door', ''), 1, 64),
    substr(coalesce(place::jsonb ->> 'building', ''), 1, 64),
    substr(coalesce(place::jsonb ->> 'unit', ''), 1, 64),
    substr(coalesce(data::jsonb ->> 'house', ''), 1, 64),
    substr(coalesce(data::jsonb ->> 'subject', ''), 1, 64),
    substr(coalesce(data::jsonb ->> 'kind', ''), 1, 16),
    'failed',
    substr(coalesce(data::jsonb ->> 'reason', ''), 1, 32),
    substr(coalesce(data::jsonb ->> 'reader', ''), 1, 64),
    substr(coalesce(data::jsonb ->> 'pass_id', ''), 1, 64),
    CASE data::jsonb ->> 'kind' WHEN 'remote' THEN substr(coalesce(data::jsonb ->> 'subject', ''), 1, 64) ELSE '' END,
    substr(coalesce(data::jsonb ->> 'detail', ''), 1, 300)
FROM events WHERE type = 'door.unlock_failed'
ON CONFLICT DO NOTHING;
