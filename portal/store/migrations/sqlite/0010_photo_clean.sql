-- 10: problem-report photos are stored re-encoded without metadata (portal/photos.py). photo_clean = 0: a photo
-- stored before, which the portal cleans (or drops, when it is not JPEG, PNG or WebP) at its next start.
ALTER TABLE work_items ADD COLUMN photo_clean INTEGER NOT NULL DEFAULT 0;
UPDATE work_items SET photo_clean = 1 WHERE photo IS NULL;
