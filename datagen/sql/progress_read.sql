-- The world and the last business day committed to the source.
SELECT world, last_day FROM datagen_progress
