-- Escalation from warning to critical pages once.
UPDATE monitor_incidents SET peak_severity = 'critical'
WHERE check_name = :check_name AND :severity = 'critical' AND peak_severity <> 'critical'
RETURNING check_name
