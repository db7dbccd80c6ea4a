-- Apply one increment (an as_of partition of __changes, or a staged increment) to the current
-- table, by primary key.
-- The newer version of a row wins, so re-running an older as_of never regresses a row that a
-- later sync brought; a tie (the same version read again) rewrites identical values.
-- Identifiers are $$name placeholders filled with validated names; values are @parameters.
MERGE ${table} AS target
USING (
  SELECT ${columns}
  FROM ${changes}
  WHERE ${partition}
) AS source
ON ${key_match}
WHEN MATCHED AND source.${cursor} >= target.${cursor} THEN
  UPDATE SET ${update_set}
WHEN NOT MATCHED THEN
  INSERT (${columns}) VALUES (${source_columns})
