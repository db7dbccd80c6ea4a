-- The generator's progress, one row, written in the same transaction as each generated day's rows:
-- the world (made by each generate) and the last business day the source holds.
CREATE TABLE IF NOT EXISTS datagen_progress (world text NOT NULL, last_day date NOT NULL)
