"""The worker's /metrics series the alert rules read exist from the start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
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


def test_a_scrape_does_not_hang_on_a_locked_queue_table(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration holding ACCESS EXCLUSIVE on scoring_jobs (or a database that stopped
    answering) must cost one scrape without queue gauges, not a scrape that never ends: it held
    the collector's lock, so every later scrape hung behind it (and Prometheus saw the worker
    as down).

    The collector's timeout is 1 s here (the shipped 5 s only made the test wait); the shipped
    value is checked to fit in Prometheus' default 10 s scrape timeout."""
    import threading

    import psycopg

    from worker import metrics
    from worker.metrics import QueueCollector

    assert metrics.COLLECT_TIMEOUT_SECONDS < 10
    monkeypatch.setattr(metrics, "COLLECT_TIMEOUT_SECONDS", 1)

    schema = Path(__file__).resolve().parents[2] / "worker" / "schema.sql"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(schema.read_text())
    collector = QueueCollector(pg_url)
    names = {m.name for m in collector.collect()}
    assert names == {"paylater_worker_queue_depth", "paylater_worker_oldest_queued_age_seconds"}

    scraped: list[set[str]] = []
    with psycopg.connect(pg_url) as locker:
        locker.execute("LOCK TABLE scoring_jobs IN ACCESS EXCLUSIVE MODE")
        scrape = threading.Thread(
            target=lambda: scraped.append({m.name for m in collector.collect()}), daemon=True
        )
        scrape.start()
        scrape.join(60)  # generous: the bound under test is a few seconds
        hung = scrape.is_alive()
        locker.rollback()
    scrape.join(60)
    assert not hung, "the scrape waited for the lock"
    assert scraped == [set()]  # nothing rather than stale numbers
    assert {m.name for m in collector.collect()} == names  # and the next scrape reads again
