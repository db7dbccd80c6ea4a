-- Open monitoring incidents, one row per check while its condition lasts (PostgreSQL or SQLite).
-- The row's existence is the deduplication: only the run whose INSERT wins sends the alert,
-- and only the run whose DELETE wins sends the RESOLVED notice, whichever process runs them.
CREATE TABLE IF NOT EXISTS monitor_incidents (
    check_name     text PRIMARY KEY,
    severity       text NOT NULL,              -- current level: 'warning' | 'critical'
    peak_severity  text NOT NULL,              -- highest level already notified
    value          double precision,
    summary        text NOT NULL,
    opened_at      timestamp with time zone NOT NULL,
    last_seen_at   timestamp with time zone NOT NULL
)
