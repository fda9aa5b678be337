-- 6: staff accounts scoped to sites. NULL: every site (admins, and single-site estates); otherwise a JSON
-- array of site ids, and the account sees and acts on those sites' alarms, doors and events only.
ALTER TABLE users ADD COLUMN sites TEXT;
