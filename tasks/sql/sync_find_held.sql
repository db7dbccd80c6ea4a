-- DuckDB's form of sync_merge.sql, step 1 of 3: the current rows whose keys the increment
-- carries, with their row ids and change times, found in one scan of the current table (a semi
-- join hashing the small increment). Steps 2 and 3 then work from this small table alone.
CREATE OR REPLACE TEMP TABLE _held AS
SELECT target.rowid AS held_row, target.${cursor} AS held_cursor, ${target_key_columns}
FROM ${table} AS target
WHERE EXISTS (
  SELECT 1
  FROM ${changes} AS source
  WHERE ${partition} AND ${key_match}
)
