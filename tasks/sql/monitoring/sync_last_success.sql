-- The newest business day whose every ledger row succeeded, and when its last table finished
-- (BigQuery Standard SQL; transpiled for DuckDB).
SELECT as_of, MAX(finished_at) AS finished_at
FROM sync_ledger
GROUP BY as_of
HAVING SUM(CASE WHEN status = 'succeeded' THEN 1 ELSE 0 END) = COUNT(*)
ORDER BY as_of DESC
LIMIT 1
