DELETE FROM monitor_unmeasured WHERE check_name = :check_name
RETURNING since, notified_at
