INSERT INTO monitor_incidents
    (check_name, severity, peak_severity, value, summary, opened_at, last_seen_at, counted_day)
VALUES (:check_name, :severity, :severity, :value, :summary, :now, :now, :data_day)
ON CONFLICT (check_name) DO NOTHING
RETURNING check_name
