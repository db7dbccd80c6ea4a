-- One job per idempotency key: a repeated key inserts nothing and returns no row.
INSERT INTO scoring_jobs (idempotency_key, user_id, payload)
VALUES (%(idempotency_key)s, %(user_id)s, %(payload)s)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id
