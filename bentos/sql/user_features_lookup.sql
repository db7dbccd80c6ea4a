-- Online features of the users being scored (user_features_latest is replaced whole per publish).
SELECT *
FROM user_features_latest
WHERE user_id = ANY(%(user_ids)s)
