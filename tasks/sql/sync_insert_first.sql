-- The first increment into an empty current table: every row is new, so a plain INSERT gives
-- what the MERGE would, without probing the target for each key.
INSERT INTO ${table} (${columns})
SELECT ${columns}
FROM ${changes}
WHERE ${partition}
