"""Daily: drift (PSI) and vintage performance, drift alerts, and the HTML monitoring report."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.monitor import DELIVERY_BUDGET_SECONDS, Deliveries, alert_on_failure
from paylater.settings import get_settings
from paylater.timeutil import default_as_of
from tasks.alerts import delivery_pass
from tasks.dashboard import (
    DailyMonitoring,
    artifact_markdown,
    daily_monitoring,
    drift_measurements,
    drift_resolve_after_reports,
    gather_dashboard,
    not_yet_counted,
    render_dashboard,
    store_daily,
    write_dashboard,
)
from tasks.monitoring import (
    Notification,
    ensure_incident_table,
    judge,
    open_queue_db,
    reconcile,
    reconcile_unmeasured,
    utc_now,
)
from tasks.warehouse import open_warehouse


@task
def compute_daily(now: datetime) -> DailyMonitoring:
    """PSI of the latest scoring inputs against training, score PSI, vintages."""
    engine = open_queue_db(get_settings())
    try:
        return daily_monitoring(engine, now)
    finally:
        engine.dispose()


@task(retries=2, retry_delay_seconds=30)
def store(daily: DailyMonitoring) -> None:
    """Keep the day's numbers in the warehouse (monitoring_drift, monitoring_vintage)."""
    warehouse = open_warehouse(get_settings().warehouse)
    try:
        store_daily(warehouse, daily)
    finally:
        warehouse.close()


@task(retries=2, retry_delay_seconds=60)
def drift_incidents(daily: DailyMonitoring, now: datetime) -> list[Notification]:
    """Open or resolve the drift incidents and alert (same dedup table and hysteresis as the
    5-minute monitor, counted in reports: PAYLATER_MONITOR_DRIFT_RESOLVE_AFTER_REPORTS).

    A report counts once per data day (its snapshot's as_of, kept on the incident): a retry of
    this task, or a manual rerun of the report on the same snapshot, does not count as one more
    report toward resolving an incident (a result at or above its level still counts). A check
    a fault kept from being measured (an empty snapshot, a model that cannot be loaded or scored)
    is told to Slack at once as [UNMEASURED], and RESOLVED at the first report that measures it
    (monitor_unmeasured, as the monitor's checks). An alert not delivered (Slack 429/5xx, PagerDuty
    refusing the page) leaves its incident unchanged for a resend, and these checks run once a
    day: the task fails, so Prefect resends it, and once its retries run out the flow fails (the
    monitor's failed_flows check pages).
    """
    settings = get_settings()
    clear_runs = drift_resolve_after_reports(settings)
    results = judge(drift_measurements(daily, settings.monitor_psi_ignore), settings)
    engine = open_queue_db(settings)
    counted = Deliveries()
    try:
        ensure_incident_table(engine)
        # As the monitor's pass: a Slack that does not answer is waited on once, not per notice.
        with delivery_pass(DELIVERY_BUDGET_SECONDS):
            delivered = reconcile(
                engine,
                results,
                now,
                deliver=counted,
                clear_runs=clear_runs,
                data_day=daily.as_of,
                # Decided under the incident's lock: two reports read apart both counted one day.
                admit=lambda result, incident: bool(
                    not_yet_counted([result], [incident] if incident else [], now, daily.as_of)
                ),
            )
            # Told at the first report that cannot measure it: the next one is a day away.
            delivered += reconcile_unmeasured(
                engine, results, now, timedelta(0), deliver=counted, data_day=daily.as_of
            )
    finally:
        engine.dispose()
    if counted.undelivered:
        subjects = "; ".join(n.subject for n in counted.undelivered)
        raise RuntimeError(
            f"drift alert(s) not delivered, incident(s) left for a resend: {subjects}"
        )
    return delivered


@task
def build_report(now: datetime, as_of: date, notes: list[str]) -> tuple[Path, str]:
    """Render the HTML report under PAYLATER_HOME/reports; returns its path and a summary."""
    settings = get_settings()
    engine = open_queue_db(settings)
    warehouse = open_warehouse(settings.warehouse)
    try:
        data = gather_dashboard(engine, warehouse, settings, now, notes)
    finally:
        warehouse.close()
        engine.dispose()
    path = write_dashboard(render_dashboard(data), settings.home_dir / "reports", as_of)
    return path, artifact_markdown(data, path)


@flow(name="monitoring-report", on_failure=[alert_on_failure])
def monitoring_report() -> Path:
    """Daily drift and vintage numbers, drift alerts, and the dashboard as a Prefect artifact."""
    now = utc_now()
    daily = compute_daily(now)
    # Each step tried even when one before it failed, the run failing after them with the first
    # error: the drift alerts need neither the warehouse (where the numbers are kept) nor the
    # report, so a warehouse held by a long sync must not leave a day's drift unsaid.
    stored = store(daily, return_state=True)
    alerted = drift_incidents(daily, now, return_state=True)
    try:
        # Named by its data day; with no snapshot yet, by the last ended business day, as a
        # report with data would be (the UTC date is a day ahead of it before 15:00 in Tokyo).
        day = daily.as_of or default_as_of(now)
        path, summary = build_report(now, day, daily.notes)
        create_markdown_artifact(
            key="monitoring-dashboard", markdown=summary, description=f"HTML report: {path}"
        )
        get_run_logger().info("monitoring report written to %s", path)
    finally:
        for step in (stored, alerted):
            if step.is_failed():
                step.result()  # raises the task's error: the run fails, naming the step
    return path


if __name__ == "__main__":
    monitoring_report()
