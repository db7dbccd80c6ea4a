-- A run measured the check of an open incident: note the value and count the measured runs in a
-- row below each level (hysteresis: the incident steps down only after enough of them). The row
-- lock this takes makes a racing monitor wait, then see this run's outcome. counted_day keeps
-- the newest data day judged (a report's snapshot; NULL for the monitor's own checks).
UPDATE monitor_incidents
SET runs_ok = CASE WHEN :severity = 'ok' THEN runs_ok + 1 ELSE 0 END,
    runs_below_critical = CASE WHEN :severity = 'critical' THEN 0 ELSE runs_below_critical + 1 END,
    value = :value, summary = :summary, last_seen_at = :now,
    counted_day = CASE
        WHEN counted_day IS NULL OR :data_day > counted_day THEN :data_day
        ELSE counted_day
    END
WHERE check_name = :check_name
RETURNING severity, peak_severity, opened_at, runs_ok, runs_below_critical
