SELECT check_name, severity, peak_severity, value, summary, opened_at, last_seen_at,
    runs_ok, runs_below_critical, counted_day
FROM monitor_incidents WHERE check_name = :check_name
