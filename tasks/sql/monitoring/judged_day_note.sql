-- A report judged the check on :data_day: keep the newest day judged, and return it. The row
-- lock this takes holds a racing report of another day until this one's transaction ends.
INSERT INTO monitor_judged_days (check_name, data_day) VALUES (:check_name, :data_day)
ON CONFLICT (check_name) DO UPDATE SET data_day = CASE
    WHEN excluded.data_day > monitor_judged_days.data_day THEN excluded.data_day
    ELSE monitor_judged_days.data_day
END
RETURNING data_day
