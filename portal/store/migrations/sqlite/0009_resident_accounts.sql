-- 9: residents' accounts (portal/registry.py, portal/estate.py). One reg_residents row per stay: a person who
-- comes back to a house gets a new row with a new subject, so an ended stay's subject and the visitor passes it
-- issued stay on the revocation list whatever becomes of the new request (the table is rebuilt without
-- UNIQUE (person_id, house_id); migrate() runs this with foreign keys off and checks them before the commit).
-- A stay the old code had put back to pending or rejected under its revoked subject becomes an ended
-- (inactive) row of its own with that subject and its visitor passes; the request gets a fresh subject.
-- request_name: the name typed in an "I live here" request, shown to whoever decides it (never the name on
-- file of an existing person). reg_people.password_request: the stay whose anonymous request chose the
-- person's password (NULL once it was set after a one-time code from the office). resident_sessions.auth_at:
-- when the session's person last gave a password or one-time code (re-authentication before sensitive acts).
CREATE TABLE reg_residents_new (
    id INTEGER PRIMARY KEY,
    person_id INTEGER NOT NULL REFERENCES reg_people(id),
    house_id INTEGER NOT NULL REFERENCES reg_houses(id),
    subject TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('owner', 'family', 'tenant')),
    status TEXT NOT NULL CHECK (status IN ('pending', 'active', 'rejected', 'inactive')),
    move_in TEXT,
    move_out TEXT,
    lease_end TEXT,
    source TEXT NOT NULL,                -- import, register (anonymous request), account (signed in), admin
    created_at TEXT NOT NULL,
    decided_at TEXT,
    decided_by TEXT,
    ever_active INTEGER NOT NULL DEFAULT 0,
    request_name TEXT
);
INSERT INTO reg_residents_new (id, person_id, house_id, subject, role, status, move_in, move_out, lease_end,
                               source, created_at, decided_at, decided_by, ever_active)
SELECT id, person_id, house_id, subject, role, status, move_in, move_out, lease_end, source, created_at,
       decided_at, decided_by, ever_active FROM reg_residents;
UPDATE reg_residents_new SET subject = 'r:' || lower(hex(randomblob(12))), ever_active = 0
WHERE status IN ('pending', 'rejected') AND ever_active = 1;
INSERT INTO reg_residents_new (person_id, house_id, subject, role, status, move_in, lease_end, source, created_at,
                               decided_at, decided_by, ever_active)
SELECT person_id, house_id, subject, role, 'inactive', move_in, lease_end, source, created_at, created_at,
       'system:migration', 1 FROM reg_residents WHERE status IN ('pending', 'rejected') AND ever_active = 1;
UPDATE visitor_passes SET resident_id = (
    SELECT n.id FROM reg_residents_new n JOIN reg_residents o ON o.subject = n.subject
    WHERE o.id = visitor_passes.resident_id)
WHERE resident_id IN (SELECT id FROM reg_residents WHERE status IN ('pending', 'rejected') AND ever_active = 1);
DROP TABLE reg_residents;
ALTER TABLE reg_residents_new RENAME TO reg_residents;
CREATE INDEX reg_residents_house ON reg_residents(house_id, status);
CREATE INDEX reg_residents_person ON reg_residents(person_id, house_id);
ALTER TABLE reg_people ADD COLUMN password_request INTEGER;
ALTER TABLE resident_sessions ADD COLUMN auth_at REAL NOT NULL DEFAULT 0;
UPDATE resident_sessions SET auth_at = created;
