UPDATE monitor_unmeasured SET notified_at = :now
WHERE check_name = :check_name AND notified_at IS NULL
RETURNING check_name
