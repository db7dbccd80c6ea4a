-- deletes: propagate. Delete the current rows whose primary key the source no longer holds
-- (${keys}: every source key, read in the same snapshot as the day's rows), inside the
-- transaction that merges the day's load.
DELETE FROM ${table} AS target
WHERE NOT EXISTS (
  SELECT 1
  FROM ${keys} AS source
  WHERE ${key_match}
)
