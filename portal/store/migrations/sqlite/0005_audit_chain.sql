-- 5: the audit trail as a hash chain (portal/audit.py): each row's hash is audit_hash(prev_hash, its fields),
-- prev_hash the row before's hash ('' for the first). audit_anchor holds the newest row's id and hash and the
-- row count, updated in the same transaction as every insert, so deleting rows at the end is detected too.
-- Existing rows are chained in id order.
ALTER TABLE audit ADD COLUMN prev_hash TEXT NOT NULL DEFAULT '';
ALTER TABLE audit ADD COLUMN hash TEXT NOT NULL DEFAULT '';
CREATE TABLE audit_anchor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_id INTEGER NOT NULL,
    hash TEXT NOT NULL,
    count INTEGER NOT NULL
);
WITH RECURSIVE chain (id, prev, h) AS (
    SELECT id, '', audit_hash('', id, at, actor, action, target, detail, remote)
    FROM audit WHERE id = (SELECT min(id) FROM audit)
    UNION ALL
    SELECT a.id, c.h, audit_hash(c.h, a.id, a.at, a.actor, a.action, a.target, a.detail, a.remote)
    FROM chain c JOIN audit a ON a.id = (SELECT min(id) FROM audit WHERE id > c.id)
)
UPDATE audit SET prev_hash = chain.prev, hash = chain.h FROM chain WHERE audit.id = chain.id;
INSERT INTO audit_anchor (id, last_id, hash, count)
SELECT 1, coalesce(max(id), 0), coalesce((SELECT hash FROM audit ORDER BY id DESC LIMIT 1), ''), count(*)
FROM audit;
