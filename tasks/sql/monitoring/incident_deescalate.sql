-- Back from critical to warning: the page is resolved, so the incident's peak is warning again
-- (a later critical escalates, and pages, anew).
UPDATE monitor_incidents SET severity = 'warning', peak_severity = 'warning'
WHERE check_name = :check_name AND :severity = 'warning' AND peak_severity = 'critical'
RETURNING check_name
