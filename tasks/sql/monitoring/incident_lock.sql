-- Serialise the read-evaluate-write of one check's incident across processes (the 5-minute
-- monitor, a manual run beside it, a slow run overlapping the next, two drift reports): held
-- until the transaction ends. A row lock alone cannot: a drift report reads the incident before
-- deciding whether its day counts, and a check with no incident yet has no row to lock.
SELECT pg_advisory_xact_lock(hashtext('monitor_incidents'), hashtext(:check_name))
