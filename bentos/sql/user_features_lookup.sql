-- Online features of the users being scored (the online table, PAYLATER_ONLINE_FEATURES_TABLE,
-- is replaced whole per publish). {table} is the table's quoted name.
SELECT *
FROM {table}
WHERE user_id = ANY(%(user_ids)s)
