-- deletes: fail, once the count check found more rows in the warehouse than at the source: how
-- many current rows have a primary key the source no longer holds (${keys}: every source key, in
-- the read's snapshot), and the first of them in key order, for the error.
SELECT ${target_key_columns}, COUNT(*) OVER () AS _sync_gone
FROM ${table} AS target
WHERE NOT EXISTS (
  SELECT 1
  FROM ${keys} AS source
  WHERE ${key_match}
)
ORDER BY ${target_key_columns}
LIMIT 1
