-- Open monitoring incidents, one row per check while its condition lasts (PostgreSQL or SQLite).
-- The row's existence is the deduplication: only the run whose INSERT wins sends the alert,
-- and only the run whose DELETE wins sends the RESOLVED notice, whichever process runs them.
-- Tables made before runs_ok, runs_below_critical and counted_day get them from
-- ensure_incident_table.
CREATE TABLE IF NOT EXISTS monitor_incidents (
    check_name     text PRIMARY KEY,
    severity       text NOT NULL,              -- the incident's level: 'warning' | 'critical'
    peak_severity  text NOT NULL,              -- level notified: 'critical' while its page is open
    value          double precision,           -- the latest measured value
    summary        text NOT NULL,              -- the latest measurement, for humans
    opened_at      timestamp with time zone NOT NULL,
    last_seen_at   timestamp with time zone NOT NULL,
    runs_ok        integer NOT NULL DEFAULT 0, -- measured runs in a row at ok
    runs_below_critical integer NOT NULL DEFAULT 0, -- measured runs in a row below critical
    counted_day    date                        -- drift: the newest report data day counted
)
