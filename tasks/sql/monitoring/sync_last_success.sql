-- Per business day, newest first: the tables whose sync succeeded and when the last of them
-- finished (BigQuery Standard SQL; transpiled for DuckDB). The caller takes the newest day on
-- which every configured table succeeded: a sync that died half way leaves only succeeded rows.
SELECT as_of, MAX(finished_at) AS finished_at, STRING_AGG(table_name, ',') AS tables
FROM sync_ledger
WHERE status = 'succeeded'
GROUP BY as_of
ORDER BY as_of DESC
