-- PSI per feature (and '__score__') of the newest drift run (BigQuery SQL).
SELECT as_of, feature, psi FROM monitoring_drift
WHERE as_of = (SELECT MAX(as_of) FROM monitoring_drift)
ORDER BY psi DESC
