-- A reread, step 1 of 2: delete the current rows whose key the re-read history holds (its version
-- replaces them, whatever their change time); step 2 (sync_insert_first.sql) appends the history.
-- A current row whose key the history lacks stays: its source row changed after the watermark
-- (a later window reads it), or is gone (deleted with the source keys, sync_delete_gone.sql).
DELETE FROM ${table} AS target
WHERE EXISTS (
  SELECT 1
  FROM ${changes} AS source
  WHERE ${partition} AND ${key_match}
)
