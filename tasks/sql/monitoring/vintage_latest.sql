-- Vintage performance as computed on the newest day (BigQuery SQL).
SELECT as_of, model_version, request_month, charges, defaults, default_rate, mean_score, auc, in_sample
FROM monitoring_vintage
WHERE as_of = (SELECT MAX(as_of) FROM monitoring_vintage)
ORDER BY request_month
