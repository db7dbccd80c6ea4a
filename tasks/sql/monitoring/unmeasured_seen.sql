-- This run could not measure the check: start its stretch, or keep its start and note the reason.
INSERT INTO monitor_unmeasured (check_name, since, reason, last_seen_at)
VALUES (:check_name, :now, :reason, :now)
ON CONFLICT (check_name) DO UPDATE SET reason = excluded.reason, last_seen_at = excluded.last_seen_at
RETURNING since, notified_at
