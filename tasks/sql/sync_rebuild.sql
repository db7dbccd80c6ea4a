-- BigQuery's first sync of a table: its whole current table is the increment just loaded into
-- the as_of partition of __changes (the window read from the beginning), written into the table
-- by one query job with WRITE_TRUNCATE.
SELECT ${columns}
FROM ${changes}
WHERE ${partition}
