SELECT severity, opened_at FROM monitor_incidents WHERE check_name = :check_name
