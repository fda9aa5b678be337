-- 16: finished screens. users.disabled_at: an account an administrator switched off (it cannot sign in; its sessions
-- ended then). site_plans / plan_marks: an estate plan drawn on the administrators' page (portal/plans.py: a cleaned
-- picture and the zones, buildings and doors placed on it), which replaces the config's site_maps entry of that
-- site. The property office's phone and hours move to the portal config (sites:), beside the emergency numbers.
ALTER TABLE users ADD COLUMN disabled_at TEXT;
CREATE TABLE site_plans (
    site TEXT PRIMARY KEY,               -- the site's wire name
    width REAL NOT NULL,                 -- the plan's own units (the picture's pixels when there is one)
    height REAL NOT NULL,
    image BLOB,                          -- re-encoded without metadata (portal/photos.py); NULL: a blank plan
    image_type TEXT,
    updated_at TEXT NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE TABLE plan_marks (
    site TEXT NOT NULL REFERENCES site_plans(site) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('zone', 'building', 'door')),
    name TEXT NOT NULL,                  -- as in events' place.zone / place.building / place.door
    label TEXT NOT NULL DEFAULT '',
    points TEXT NOT NULL,                -- JSON [[x, y], ...]: a zone's line, a building's two corners, a door
    PRIMARY KEY (site, kind, name)
) WITHOUT ROWID;
ALTER TABLE reg_sites DROP COLUMN office_phone;
ALTER TABLE reg_sites DROP COLUMN office_hours;
