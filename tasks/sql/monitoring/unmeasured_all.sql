SELECT check_name, since, reason, last_seen_at, notified_at
FROM monitor_unmeasured ORDER BY check_name
