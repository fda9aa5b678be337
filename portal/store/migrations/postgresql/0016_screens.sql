-- 16: finished screens (the comments are in ../sqlite/0016_screens.sql).
ALTER TABLE users ADD COLUMN disabled_at text;
CREATE TABLE site_plans (
    site text PRIMARY KEY,
    width double precision NOT NULL,
    height double precision NOT NULL,
    image bytea,
    image_type text,
    updated_at text NOT NULL,
    updated_by text NOT NULL
);
CREATE TABLE plan_marks (
    site text NOT NULL REFERENCES site_plans(site) ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('zone', 'building', 'door')),
    name text NOT NULL,
    label text NOT NULL DEFAULT '',
    points text NOT NULL,
    PRIMARY KEY (site, kind, name)
);
ALTER TABLE reg_sites DROP COLUMN office_phone;
ALTER TABLE reg_sites DROP COLUMN office_hours;
