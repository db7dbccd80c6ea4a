-- Whether the rows read hold each primary-key value once and never a NULL in one: run only for a
-- table whose source does not enforce its key (a view, a table without a key constraint), on the
-- loaded increment or full load before it is merged or committed. One row: how many key values
-- occur more than once (NULL-free ones), and how many rows have a NULL in a key column.
SELECT
  COUNTIF(NOT keyed._sync_null_key AND keyed._sync_copies > 1) AS duplicated_keys,
  COALESCE(SUM(IF(keyed._sync_null_key, keyed._sync_copies, 0)), 0) AS null_key_rows
FROM (
  SELECT ${key_has_null} AS _sync_null_key, COUNT(*) AS _sync_copies
  FROM ${changes}
  WHERE ${partition}
  GROUP BY ${key_columns}
) AS keyed
