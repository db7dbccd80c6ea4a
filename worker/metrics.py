"""Prometheus metrics of the worker: throughput, failures, latency, and the queue's backlog."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Enqueue-to-result latency: the app waits on this, so the buckets are fine below a second.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
FAILURE_REASONS = ("invalid", "error")
DATABASE_ERROR_REASONS = ("no_answer", "error")
COLLECT_TIMEOUT_SECONDS = 5
"""Connecting to the queue database and reading its backlog, each, at scrape time (Prometheus'
default scrape timeout is 10 s)."""


class WorkerMetrics:
    """The worker's counters and histograms, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.processed = Counter(
            "paylater_worker_jobs_processed",
            "Jobs scored and written to scoring_results.",
            registry=r,
        )
        self.failed = Counter(
            "paylater_worker_jobs_failed",
            "Failed attempts: reason=invalid (the request, never retried) or error (retried).",
            ["reason"],
            registry=r,
        )
        # Exported at 0 from the start: rate() and increase() take a labelled series' first
        # sample as its baseline, so failures it was born with would never reach the alerts.
        for reason in FAILURE_REASONS:
            self.failed.labels(reason)
        self.dead_lettered = Counter(
            "paylater_worker_jobs_dead_lettered", "Jobs that ran out of attempts.", registry=r
        )
        self.held = Counter(
            "paylater_worker_jobs_held",
            "Jobs given back with no attempt spent: the scoring service or feature database could"
            " not be reached, or the queue connection was lost before the batch was written (not"
            " failed attempts; the queue-age alerts cover an outage).",
            registry=r,
        )
        self.lease_lost = Counter(
            "paylater_worker_lease_lost",
            "Scores dropped because another worker had re-claimed the job (lease ran out).",
            registry=r,
        )
        self.database_errors = Counter(
            "paylater_worker_database_errors",
            "Queue database calls that failed (reason=error) or got no answer within"
            " PAYLATER_WORKER_DATABASE_TIMEOUT_SECONDS, or reconnects (the loops' or the NOTIFY"
            " listener's) none within their connect_timeout (reason=no_answer: a silent network);"
            " the loop reconnects and gives its batch back.",
            ["reason"],
            registry=r,
        )
        for reason in DATABASE_ERROR_REASONS:
            self.database_errors.labels(reason)
        self.shadow_failed = Counter(
            "paylater_worker_shadow_failed", "Batches the shadow model failed to score.", registry=r
        )
        self.latency = Histogram(
            "paylater_worker_job_latency_seconds",
            "Enqueue-to-result latency of scored jobs.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "paylater_worker_batch_size",
            "Jobs per claimed batch.",
            buckets=(1, 5, 25, 100, 250, 500, 1000, 5000),
            registry=r,
        )


class QueueCollector(Collector):
    """Queue depth and the oldest due job's age, read from the table at scrape time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One query per scrape; a failed query reports nothing rather than stale numbers."""
        from paylater.postgres import connect_bounded
        from worker.queue import queue_stats, require_postgres

        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    # Bounded, so a locked table or a database that stopped answering (a silent
                    # network: no statement_timeout reaches it) costs one scrape its gauges
                    # instead of hanging it and every scrape queued behind it.
                    self._conn = connect_bounded(
                        require_postgres(self.url),
                        COLLECT_TIMEOUT_SECONDS + 1,  # the server's statement_timeout speaks first
                        autocommit=True,
                        connect_timeout=COLLECT_TIMEOUT_SECONDS,
                    )
                    self._conn.execute(
                        f"SET statement_timeout = {int(COLLECT_TIMEOUT_SECONDS * 1000)}"
                    )
                depth, oldest = queue_stats(self._conn)
            except Exception as exc:  # a scrape must never take the worker down
                log.warning("queue stats unavailable: %s", exc)
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                return
        yield GaugeMetricFamily(
            "paylater_worker_queue_depth", "Jobs queued (due or backing off).", value=depth
        )
        yield GaugeMetricFamily(
            "paylater_worker_oldest_queued_age_seconds",
            "Age of the oldest job due now: queued past its run_after, or running past an"
            " expired lease (its worker died); 0 when none.",
            value=oldest,
        )


def serve_metrics(metrics: WorkerMetrics, url: str, port: int, addr: str = "0.0.0.0") -> Any:
    """Start the /metrics HTTP server (a daemon thread) with the queue gauges; returns the server."""
    metrics.registry.register(QueueCollector(url))
    server, _thread = start_http_server(port, addr=addr, registry=metrics.registry)
    return server
