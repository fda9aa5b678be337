-- 13: revocations and blocks made by hand (portal/revocations.py): a single pass revoked (a guardroom visitor's or
-- a resident's visitor pass, by staff or the resident who issued it), or a person blocked (a resident: every
-- subject they hold on the site; a guardroom visitor: that registration's subject). They go on the site's signed
-- revocation list until ``until`` (NULL: until lifted). Who, when and why are kept; the audit trail has them too.
CREATE TABLE revocations (
    id INTEGER PRIMARY KEY,
    site TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('pass', 'block')),
    pass_id TEXT,                        -- hex: a revoked pass
    subject TEXT,                        -- a blocked subject (a visitor's), when no person is behind it
    -- No foreign keys: retention deletes old visitor rows; what is shown is read through joins.
    person_id INTEGER,                   -- reg_people.id: a blocked resident
    visitor_id INTEGER,                  -- guard_visitors.id: a guardroom visitor (their pass, or them)
    visitor_pass_id INTEGER,             -- visitor_passes.id: a resident's visitor pass
    reason TEXT NOT NULL,
    until INTEGER,                       -- unix: on the signed list until then; NULL: until lifted
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,            -- "guard:bob", "resident:12"
    lifted_at TEXT,
    lifted_by TEXT,
    CHECK ((kind = 'pass') = (pass_id IS NOT NULL))
);
CREATE INDEX revocations_site ON revocations(site, lifted_at);
CREATE INDEX revocations_person ON revocations(person_id) WHERE person_id IS NOT NULL;
