-- Serialise creating (or upgrading) the incident tables across monitors: two CREATE TABLE IF NOT
-- EXISTS racing on a new database both try to add the table's type, and the second fails with a
-- duplicate key on pg_type. The one-key form: apart from the per-check locks (incident_lock).
SELECT pg_advisory_xact_lock(hashtext('monitor_incidents'))
