-- A failed rerun of a day that succeeded: its error and time on the succeeded row, whose status
-- and figures stay the succeeded run's (the failed one rolled back; see record_failure).
UPDATE sync_ledger
SET error = CAST(@error AS STRING), failed_at = @failed_at
WHERE table_name = @table_name AND as_of = @as_of AND status = 'succeeded'
