-- The job of an idempotency key, and whether it is the same request (user and amount): a key
-- reused for another request must not be answered with the first one's job.
SELECT id,
       user_id = %(user_id)s AND payload -> 'amount_jpy' = (%(payload)s::jsonb) -> 'amount_jpy'
           AS same_request,
       user_id,
       payload::text
FROM scoring_jobs
WHERE idempotency_key = %(idempotency_key)s
