-- The incident's level changes (escalated to critical, or back to warning): peak_severity is the
-- level notified, so 'critical' means its page is open.
UPDATE monitor_incidents SET severity = :level, peak_severity = :level
WHERE check_name = :check_name
