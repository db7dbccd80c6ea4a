-- The status of a table's ledger row for one as_of (no row: no run of that day yet).
SELECT status
FROM sync_ledger
WHERE table_name = @table_name AND as_of = @as_of
