"""Every 5 minutes: queue, worker failures, sync and feature freshness; alert once per incident."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task

from paylater.settings import get_settings
from tasks.monitoring import (
    CheckResult,
    Notification,
    ensure_incident_table,
    judge,
    measure_all,
    open_queue_db,
    reconcile,
    status_json,
    utc_now,
)


def alert_on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """The monitor's own failure pages like any other flow's (tasks.alerts hook)."""
    from tasks.alerts import alert_on_failure as hook

    hook(flow, flow_run, state)


@task
def run_checks(now: datetime) -> list[CheckResult]:
    """Measure everything and judge it against the configured thresholds."""
    settings = get_settings()
    engine = open_queue_db(settings)
    try:
        return judge(measure_all(settings, engine, now), settings)
    finally:
        engine.dispose()


def deliver(notification: Notification) -> bool:
    """Send through tasks.alerts.notify: Slack for all, PagerDuty triggers criticals and resolves.

    `retried`: a refused notice is resent by the next run, so while PagerDuty refuses a page with
    a retryable error, Slack is not told yet (it hears the notice once, after the page).
    """
    from tasks.alerts import notify

    n = notification
    return notify(
        n.subject,
        n.body,
        severity=n.severity,
        dedup_key=n.dedup_key,
        resolve=n.resolve_page,
        retried=True,
    )


@task
def update_incidents(results: list[CheckResult], now: datetime) -> list[Notification]:
    """Open, escalate or resolve incidents and alert on each change; returns what was delivered.

    An alert not delivered (no channel took it, or PagerDuty refused the page with a retryable
    error) leaves its incident unchanged, so the next run sends it again.
    """
    engine = open_queue_db(get_settings())
    try:
        ensure_incident_table(engine)
        return reconcile(engine, results, now, deliver=deliver)
    finally:
        engine.dispose()


@flow(name="monitor", on_failure=[alert_on_failure])
def monitor() -> list[CheckResult]:
    """Check the system, update incident state, and alert on what opened or cleared."""
    now = utc_now()
    results = run_checks(now)
    sent = len(update_incidents(results, now))
    get_run_logger().info("%d notification(s) sent; checks:\n%s", sent, status_json(results))
    return results


if __name__ == "__main__":
    monitor()
