-- 7: data retention (portal/retention.py). audit_epoch: where the audit chain starts once its oldest rows are
-- pruned (the id and hash of the last pruned row, how many rows were pruned in all); the retention.purge row
-- that planned the pruning is in the kept chain and attests it. reg_people.purged_at: a former resident whose
-- name and phone were anonymised. Indexes for the purge's range deletes.
CREATE TABLE audit_epoch (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    through_id INTEGER NOT NULL,
    hash TEXT NOT NULL,
    pruned INTEGER NOT NULL,
    at TEXT NOT NULL
);
ALTER TABLE reg_people ADD COLUMN purged_at TEXT;
CREATE INDEX events_ts ON events(ts);
CREATE INDEX guard_visitors_expiry ON guard_visitors(not_after);
CREATE INDEX visitor_passes_expiry ON visitor_passes(not_after);
