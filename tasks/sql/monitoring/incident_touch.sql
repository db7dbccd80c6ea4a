UPDATE monitor_incidents
SET severity = :severity, value = :value, summary = :summary, last_seen_at = :now
WHERE check_name = :check_name
