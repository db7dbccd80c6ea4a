-- The outcome of one table's sync for one as_of (see tasks/sync.py for the invariants checked).
INSERT INTO sync_ledger (
  table_name, as_of, mode, watermark_from, watermark_to, rows_extracted, rows_loaded,
  warehouse_rows, duration_seconds, status, error, finished_at, rows_deleted,
  warning, reread, failed_at
)
VALUES (
  @table_name, @as_of, @mode, CAST(@watermark_from AS TIMESTAMP), @watermark_to,
  CAST(@rows_extracted AS INT64), CAST(@rows_loaded AS INT64), CAST(@warehouse_rows AS INT64),
  @duration_seconds, @status, CAST(@error AS STRING), @finished_at,
  CAST(@rows_deleted AS INT64), CAST(@warning AS STRING), @reread,
  CAST(@failed_at AS TIMESTAMP)
)
