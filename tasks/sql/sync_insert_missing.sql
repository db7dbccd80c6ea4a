-- DuckDB's form of sync_merge.sql, step 3 of 3: insert each increment row unless the current
-- table holds a strictly newer version of its key (a rerun of an older as_of), which stays.
INSERT INTO ${table} (${columns})
SELECT ${columns}
FROM ${changes} AS source
WHERE ${partition} AND NOT EXISTS (
  SELECT 1
  FROM _held AS target
  WHERE ${key_match} AND target.held_cursor > source.${cursor}
)
