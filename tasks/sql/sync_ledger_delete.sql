-- One ledger row per (table_name, as_of): a rerun replaces the previous attempt's row.
DELETE FROM sync_ledger
WHERE table_name = @table_name AND as_of = @as_of
