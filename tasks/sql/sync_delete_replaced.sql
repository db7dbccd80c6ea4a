-- DuckDB's form of sync_merge.sql, step 2 of 3: delete, by row id, the current rows the increment
-- replaces (its version is as new or newer); step 3 (sync_insert_missing.sql) appends the new
-- versions. An UPDATE in place makes DuckDB rewrite every column of each row group it touches
-- when it checkpoints; a delete only marks rows, and the new versions go into fresh row groups.
DELETE FROM ${table}
WHERE rowid IN (
  SELECT target.held_row
  FROM _held AS target
  JOIN ${changes} AS source ON ${key_match}
  WHERE ${partition} AND source.${cursor} >= target.held_cursor
)
