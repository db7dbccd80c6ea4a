-- DuckDB's form of sync_merge.sql, step 1: delete the current rows that the increment replaces
-- (its version is as new or newer); step 2 (sync_insert_missing.sql) appends the new versions.
-- An UPDATE in place makes DuckDB rewrite every column of each row group it touches when it
-- checkpoints; a delete only marks rows, and the new versions go into fresh row groups.
MERGE ${table} AS target
USING (
  SELECT ${key_columns}, ${cursor}
  FROM ${changes}
  WHERE ${partition}
) AS source
ON ${key_match}
WHEN MATCHED AND source.${cursor} >= target.${cursor} THEN
  DELETE
