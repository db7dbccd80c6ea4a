DELETE FROM monitor_incidents WHERE check_name = :check_name
RETURNING opened_at, peak_severity
