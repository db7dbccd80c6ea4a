SELECT id FROM scoring_jobs WHERE idempotency_key = %(idempotency_key)s
