-- After sync_key_check.sql found a problem: the first key value (in key order) of one kind, a
-- repeated one or one with a NULL part (${having}), and how many rows carry it, for the error.
SELECT ${key_columns}, COUNT(*) AS _sync_copies
FROM ${changes}
WHERE ${partition}
GROUP BY ${key_columns}
HAVING ${having}
ORDER BY ${key_columns}
LIMIT 1
