"""The worker's /metrics series the alert rules read exist from the start."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from worker.metrics import WorkerMetrics

RULES = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus-rules.yml"


def test_failure_counters_are_exported_at_zero_before_the_first_failure() -> None:
    """rate() and increase() need a sample before the first failure: a labelled counter that
    first appears at 5 counts those 5 failures as its starting point, so a burst of failures
    right after a worker (re)starts would never reach the failure-rate alerts."""
    exported = generate_latest(WorkerMetrics().registry).decode()
    for reason in ("invalid", "error"):
        assert f'paylater_worker_jobs_failed_total{{reason="{reason}"}} 0.0' in exported
    assert "paylater_worker_jobs_processed_total 0.0" in exported
    assert "paylater_worker_jobs_dead_lettered_total 0.0" in exported


def test_every_worker_metric_the_rules_read_is_one_the_worker_exports() -> None:
    rules = RULES.read_text()
    read = set(re.findall(r"\b(paylater_worker_[a-z_]+)", rules))
    exported = set(
        re.findall(
            r"^(paylater_worker_[a-z_]+)", generate_latest(WorkerMetrics().registry).decode(), re.M
        )
    )
    gauges = {"paylater_worker_queue_depth", "paylater_worker_oldest_queued_age_seconds"}
    assert read and read <= exported | gauges, read - exported - gauges
    assert yaml.safe_load(rules)["groups"]
