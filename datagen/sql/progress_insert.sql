-- The progress of a new world (its table emptied first).
INSERT INTO datagen_progress (world, last_day) VALUES (?, ?)
