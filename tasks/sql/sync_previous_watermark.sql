-- Where an incremental sync of @as_of starts: the watermark of the latest earlier as_of that
-- succeeded (no row: never synced, read from the beginning), and how many rows the warehouse
-- table held after it. Reruns of @as_of get the same start.
SELECT watermark_to AS watermark_from, warehouse_rows
FROM sync_ledger
WHERE table_name = @table_name AND as_of < @as_of AND status = 'succeeded'
ORDER BY watermark_to DESC
LIMIT 1
