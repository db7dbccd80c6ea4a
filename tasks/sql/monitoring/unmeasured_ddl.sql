-- Checks the monitor could not measure (level 'unknown' because its source did not answer, not
-- for too few jobs to judge), one row per check while that lasts (PostgreSQL or SQLite). Apart
-- from monitor_incidents, so that an open incident of the same check stays as it was. Only the
-- run whose UPDATE sets notified_at sends the warning, and only the run whose DELETE wins sends
-- the RESOLVED notice, whichever process runs them.
CREATE TABLE IF NOT EXISTS monitor_unmeasured (
    check_name    text PRIMARY KEY,
    since         timestamp with time zone NOT NULL,  -- the first run that could not measure it
    reason        text NOT NULL,                      -- what the latest such run's measurement said
    last_seen_at  timestamp with time zone NOT NULL,
    notified_at   timestamp with time zone            -- when the warning went out; NULL: not yet
)
