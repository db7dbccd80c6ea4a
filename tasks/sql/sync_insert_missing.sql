-- DuckDB's form of sync_merge.sql, step 2: insert each increment row whose key the current
-- table no longer holds (new, or deleted by step 1). A key still held has a newer version
-- there (a rerun of an older as_of), which stays.
-- The keys still held are found first with a semi join that hashes the small increment and
-- scans the current table once; a NOT EXISTS straight against the current table would hash
-- every key of it (DuckDB builds an anti join's hash table on the inner side).
INSERT INTO ${table} (${columns})
WITH held AS (
  SELECT ${target_key_columns}
  FROM ${table} AS target
  WHERE EXISTS (
    SELECT 1
    FROM ${changes} AS source
    WHERE ${partition} AND ${key_match}
  )
)
SELECT ${columns}
FROM ${changes} AS source
WHERE ${partition} AND NOT EXISTS (
  SELECT 1
  FROM held AS target
  WHERE ${key_match}
)
