-- Every table's ledger row for one as_of.
SELECT table_name, status, error, watermark_to
FROM sync_ledger
WHERE as_of = @as_of
