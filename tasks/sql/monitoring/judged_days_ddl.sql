-- The newest data day a report judged each check on (the monitoring report's snapshot as_of;
-- the monitor's own checks judge the present and keep none). Kept while the check is measured
-- too, so that a report of an older day (a backfill) can be told apart from the present one.
CREATE TABLE IF NOT EXISTS monitor_judged_days (
    check_name  text PRIMARY KEY,
    data_day    date NOT NULL
)
