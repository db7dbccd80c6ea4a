-- Forget the progress of an earlier world (same transaction as the rows that replace it).
DELETE FROM datagen_progress
