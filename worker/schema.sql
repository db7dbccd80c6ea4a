-- The asynchronous scoring contract (PostgreSQL). Any language enqueues with ONE statement:
--
--   INSERT INTO scoring_jobs (idempotency_key, user_id, payload)
--   VALUES ('order-123', 42, '{"amount_jpy": 30000}')
--   ON CONFLICT (idempotency_key) DO NOTHING
--   RETURNING id;                       -- no row back: the key was already enqueued
--
-- No row back: read the key's job (SELECT id, user_id, payload ... WHERE idempotency_key = ...)
-- and use it only when user_id and payload->'amount_jpy' are the ones just sent; otherwise the key
-- names another request (a client bug) and that job's result is not this request's answer
-- (worker/sql/job_by_key.sql; `paylater enqueue` and worker.queue.enqueue refuse such a key).
-- Send NULL, never '', for "no key": an empty key is one key that every such request shares
-- (worker.queue.enqueue refuses it). A key has at most 255 characters (MAX_IDEMPOTENCY_KEY_LENGTH):
-- the unique index refuses one over about 2.7 kB with an error; `paylater enqueue` refuses more
-- than 255. user_id is a positive bigint; a job for user_id < 1, or an amount outside the limits,
-- is inserted (no CHECK here) and fails with the reason: an app's INSERT is never refused for it.
-- The app then reads the answer from scoring_results (job_id = id) once scoring_jobs.status = 'done'.
-- payload: {"amount_jpy": <int yen within paylater.product limits>}; other keys are ignored.
--
-- Job life: queued -> running (claimed under a lease) -> done | failed | dead.
--   done    a row exists in scoring_results (exactly one, whatever crashed on the way);
--   failed  the request itself is invalid (bad payload, unknown user): never retried, error says why;
--   dead    attempts ran out (scoring kept failing, or workers kept dying on it): error holds the last cause.
-- A transient failure puts the job back to queued with run_after pushed out (exponential backoff).
-- A backend that cannot be reached at all (scoring service or feature database down), or that
-- fails every request (the last one it answered fails too), does the same without spending an
-- attempt: an outage never dead-letters jobs.
-- A worker that dies leaves its jobs running; they are claimed again once lease_until has passed,
-- each alone (one of them may be what killed it: only that one should die with the next worker).
-- Retention: the monitor deletes finished jobs (with their results) PAYLATER_WORKER_RETENTION_DAYS
-- after they finished (default 90), so an idempotency key is remembered that long after its job.
-- Safe to apply repeatedly (the worker applies it at start under an advisory lock).

CREATE TABLE IF NOT EXISTS scoring_jobs (
    id              bigserial PRIMARY KEY,
    idempotency_key text UNIQUE,                      -- NULL: no deduplication
    user_id         bigint NOT NULL,
    payload         jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'done', 'failed', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,       -- claims so far, less those given back after
                                                      -- an unreachable backend (also the fencing token)
    run_after       timestamptz NOT NULL DEFAULT now(),  -- not claimed before this (retry backoff)
    lease_until     timestamptz,                      -- while running: re-claimable after this
    error           text,                             -- last error; kept if a later attempt succeeds
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The claim query walks this index in due order: queued jobs by run_after, running jobs by
-- lease_until (expired leases are due). Finished jobs leave it, so it stays as small as the backlog.
CREATE INDEX IF NOT EXISTS scoring_jobs_due
    ON scoring_jobs ((CASE WHEN status = 'queued' THEN run_after ELSE lease_until END))
    WHERE status IN ('queued', 'running');

-- Finished jobs by when they finished: the monitor's failure-rate window and the retention purge
-- (worker/sql/purge.sql) read this instead of the whole table, which keeps every job for the
-- retention period. On a large existing queue, create it (and scoring_results_scored_at) with
-- CREATE INDEX CONCURRENTLY before upgrading: here it would hold up inserts while it builds.
CREATE INDEX IF NOT EXISTS scoring_jobs_finished
    ON scoring_jobs (updated_at)
    WHERE status IN ('done', 'failed', 'dead');

CREATE TABLE IF NOT EXISTS scoring_results (
    job_id        bigint PRIMARY KEY REFERENCES scoring_jobs (id) ON DELETE CASCADE,
    probability   double precision NOT NULL,          -- probability of default
    decision      text NOT NULL CHECK (decision IN ('approve', 'decline')),
    model_version text NOT NULL,                      -- registry version of paylater-default
    reason_codes  jsonb NOT NULL,                     -- list of codes pushing the score up
    scored_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The dashboard's days and the score PSI's last day of production scores.
CREATE INDEX IF NOT EXISTS scoring_results_scored_at ON scoring_results (scored_at);

-- The staging candidate's opinion of the same job; never read by the app, never changes a decision.
CREATE TABLE IF NOT EXISTS shadow_results (
    job_id        bigint NOT NULL REFERENCES scoring_jobs (id) ON DELETE CASCADE,
    model_version text NOT NULL,
    probability   double precision NOT NULL,
    decision      text NOT NULL CHECK (decision IN ('approve', 'decline')),
    scored_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_id, model_version)
);

-- Wake idle workers. One NOTIFY per statement (not per row) keeps bulk inserts cheap; PostgreSQL
-- also folds identical notifications within a transaction.
CREATE OR REPLACE FUNCTION scoring_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('scoring_jobs', '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER scoring_jobs_notify
    AFTER INSERT ON scoring_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION scoring_jobs_notify();
