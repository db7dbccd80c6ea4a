-- Where an incremental sync of @as_of starts: the watermark of the latest earlier as_of that
-- succeeded (NULL: never synced, read from the beginning). Reruns of @as_of get the same start.
SELECT MAX(watermark_to) AS watermark_from
FROM sync_ledger
WHERE table_name = @table_name AND as_of < @as_of AND status = 'succeeded'
