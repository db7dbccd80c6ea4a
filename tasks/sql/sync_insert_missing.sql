-- DuckDB's form of sync_merge.sql, step 2: insert each increment row whose key the current
-- table no longer holds (new, or deleted by step 1). A key still held has a newer version
-- there (a rerun of an older as_of), which stays.
INSERT INTO ${table} (${columns})
SELECT ${columns}
FROM ${changes} AS source
WHERE ${partition} AND NOT EXISTS (
  SELECT 1
  FROM ${table} AS target
  WHERE ${key_match}
)
