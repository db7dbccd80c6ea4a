-- The rows a table's earlier runs for one as_of deleted (NULL: none counted, or no earlier run).
SELECT rows_deleted
FROM sync_ledger
WHERE table_name = @table_name AND as_of = @as_of
