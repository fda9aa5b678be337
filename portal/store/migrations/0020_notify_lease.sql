-- 20: a lease on each escalation notice (portal/alarms/notify.py), so that of several portal instances sharing the
-- store exactly one sends each attempt, and a living one takes up what a stopped one left pending. Before an
-- attempt an instance claims the row (owner: its id; lease_until: until when the attempt may last); between
-- attempts lease_until is when the next is due. Wall-clock unix seconds (the instances share no monotonic clock).
-- One file for both engines: the SQL both read.
ALTER TABLE notifications ADD COLUMN owner TEXT;
ALTER TABLE notifications ADD COLUMN lease_until DOUBLE PRECISION;
