-- How many succeeded syncs of a table the ledger holds, over every as_of (0: none ever
-- succeeded, so whatever the warehouse holds under its name was left by unfinished runs).
SELECT COUNT(*) AS n
FROM sync_ledger
WHERE table_name = @table_name AND status = 'succeeded'
