"""Every 5 minutes: queue, worker failures, sync and feature freshness; alert once per incident."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from prefect import flow, get_run_logger, task

from paylater.redaction import redact, safe_cause
from paylater.settings import get_settings
from tasks.monitoring import (
    CheckResult,
    Notification,
    check_windows,
    ensure_incident_table,
    judge,
    measure_all,
    open_queue_db,
    reconcile,
    reconcile_unmeasured,
    resolve_after_runs,
    status_json,
    thresholds,
    unknown_alert_after,
    utc_now,
)

DELIVERY_BUDGET_SECONDS = 120.0
"""The most one pass may spend delivering its notices, well inside its 5-minute schedule: past
it, the rest are not tried (the next pass resends them), so a slow receiver cannot hold the
pass's incident locks until the next scheduled runs pile up behind it. A receiver that does not
answer costs one delivery deadline per pass, not one per notice (tasks.alerts.delivery_pass)."""


def alert_on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """The monitor's own failure pages like any other flow's (tasks.alerts hook)."""
    from tasks.alerts import alert_on_failure as hook

    hook(flow, flow_run, state)


def alert_on_new_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """alert_on_failure, unless the previous finished run of this flow failed with the same
    message: a cause that fails every 5-minute run (a setting, the queue database down) is told
    once, not 12 times an hour; the heartbeat, withheld meanwhile, keeps paging."""
    import logging

    if _failed_alike_before(flow_run, state):
        logging.getLogger(__name__).warning(
            "monitor failed as its previous run did (%s): Slack already told", state.message
        )
        return
    alert_on_failure(flow, flow_run, state)


def _failed_alike_before(flow_run: Any, state: Any) -> bool:
    """Whether the previous finished run of this flow (same deployment, or none) FAILED with the
    same message; False when the Prefect API cannot say (better told twice than never)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterId,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from tasks.monitoring import FLOW_RUN_READ_TIMEOUT_SECONDS, TERMINAL_STATES

    deployment = getattr(flow_run, "deployment_id", None)
    same_deployment = (
        FlowRunFilterDeploymentId(any_=[deployment])
        if deployment
        else FlowRunFilterDeploymentId(is_null_=True)
    )
    finished = FlowRunFilterStateType(any_=[StateType(n) for n in TERMINAL_STATES])
    try:
        with (
            temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}),
            get_client(
                httpx_settings={"timeout": FLOW_RUN_READ_TIMEOUT_SECONDS}, sync_client=True
            ) as client,
        ):
            previous = client.read_flow_runs(
                flow_filter=FlowFilter(id=FlowFilterId(any_=[flow_run.flow_id])),
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(not_any_=[flow_run.id]),
                    deployment_id=same_deployment,
                    state=FlowRunFilterState(type=finished),
                ),
                sort=FlowRunSort.END_TIME_DESC,
                limit=1,
            )
    except Exception:  # the API down: tell
        return False
    if not previous or previous[0].state is None:
        return False
    before = previous[0].state
    return before.type == StateType.FAILED and (before.message or "") == (state.message or "")


@task
def run_checks(now: datetime) -> list[CheckResult]:
    """Measure everything and judge it against the configured thresholds."""
    settings = get_settings()
    thresholds(settings)  # levels that cannot work fail the run now, naming their settings
    unknown_alert_after(settings)
    resolve_after_runs(settings)
    check_windows(settings)
    engine = open_queue_db(settings)
    try:
        return judge(measure_all(settings, engine, now), settings)
    finally:
        engine.dispose()


def deliver(notification: Notification) -> bool:
    """Send through tasks.alerts.notify: Slack for all, PagerDuty triggers criticals and resolves.

    `retried`: a refused notice is resent by the next run, so while PagerDuty refuses a page with
    a retryable error, Slack is not told yet (it hears the notice once, after the page), but only
    with a heartbeat configured: its withheld ping pages meanwhile. Without one, holding Slack
    back left a critical alert unheard anywhere for as long as PagerDuty was down; Slack is told
    at once, marked NOT PAGED, and the notice is still resent until PagerDuty takes it.
    """
    from tasks.alerts import notify

    n = notification
    return notify(
        n.subject,
        n.body,
        severity=n.severity,
        dedup_key=n.dedup_key,
        resolve=n.resolve_page,
        retried=bool(get_settings().monitor_heartbeat_url),
    )


class Deliveries:
    """`deliver`, remembering each notification it could not deliver (to resend, to report)."""

    def __init__(self) -> None:
        self.undelivered: list[Notification] = []

    def __call__(self, notification: Notification) -> bool:
        sent = deliver(notification)
        if not sent:
            self.undelivered.append(notification)
        return sent


@task
def update_incidents(
    results: list[CheckResult], now: datetime
) -> tuple[list[Notification], list[Notification]]:
    """Open, escalate or resolve incidents and alert on each change, then warn of checks left
    unmeasured too long (and say when they are measured again); returns what was delivered and
    what was not.

    An alert not delivered (no channel took it, or PagerDuty refused the page with a retryable
    error) leaves its incident (or unmeasured state) unchanged, so the next run sends it again.
    An incident database that does not answer fails the run, as it always did: the flow's
    failure alert (IncidentStateUnavailable: the database, its setting, and the checks judged
    critical or warning, which no incident could carry) and the withheld heartbeat say so.
    """
    from tasks.alerts import delivery_pass

    counted = Deliveries()
    settings = get_settings()
    engine = open_queue_db(settings)
    try:
        ensure_incident_table(engine)
        clear_runs = resolve_after_runs(settings)
        after = unknown_alert_after(settings)
        with delivery_pass(DELIVERY_BUDGET_SECONDS):
            ordered = most_urgent_first(results)
            delivered = reconcile(engine, ordered, now, deliver=counted, clear_runs=clear_runs)
            delivered += reconcile_unmeasured(engine, ordered, now, after, deliver=counted)
        return delivered, counted.undelivered
    except sa.exc.DBAPIError as exc:
        raise IncidentStateUnavailable(incident_db_failure(settings, exc, results)) from safe_cause(
            exc
        )
    finally:
        engine.dispose()


def most_urgent_first(results: list[CheckResult]) -> list[CheckResult]:
    """Critical results first, then warnings (each in check order): a pass that runs out of
    delivery budget has paged before it spends the rest on Slack-only notices."""
    rank = {"critical": 0, "warning": 1}
    return sorted(results, key=lambda r: rank.get(r.level, 2))


class IncidentStateUnavailable(RuntimeError):
    """The queue database, which keeps the incident state, could not be used: the run fails."""


def incident_db_failure(settings: Any, exc: sa.exc.DBAPIError, results: list[CheckResult]) -> str:
    """What the run's failure alert says: which database (its setting and host), its role, the
    driver's reason, and the checks judged critical or warning this run (otherwise unsaid until
    it answers). The same each run while nothing changes, so the alert is told once."""
    setting, url = (
        ("PAYLATER_WORKER_DATABASE_URL", settings.worker_database_url)
        if settings.worker_database_url
        else ("PAYLATER_SOURCE_URL", settings.source)
    )
    reason = " ".join(str(exc.orig or exc).split())
    judged = [
        f"{level}: {', '.join(r.check for r in results if r.level == level) or 'none'}"
        for level in ("critical", "warning")
    ]
    return redact(
        f"the queue database {setting} ({url}), which keeps the incident state, failed: {reason};"
        f" incidents not updated and this run's alerts not sent; judged this run: {'; '.join(judged)}"
    )


@task
def send_heartbeat(undelivered: list[Notification]) -> str:
    """Ping the dead-man's switch, unless an alert this run owed was not delivered: its silence
    then pages through the heartbeat service, the one channel that does not depend on ours."""
    from tasks.alerts import heartbeat

    url = get_settings().monitor_heartbeat_url
    if not url:
        return "not configured"
    if undelivered:
        get_run_logger().warning(
            "heartbeat withheld: %d alert(s) not delivered (%s)",
            len(undelivered),
            "; ".join(n.subject for n in undelivered[:3]),
        )
        return "withheld"
    return "sent" if heartbeat(url) else "failed"


@task
def purge_finished_jobs(now: datetime) -> int:
    """Delete jobs that finished more than worker_retention_days ago (a bounded batch per run)."""
    from datetime import timedelta

    from worker import queue

    settings = get_settings()
    if settings.worker_retention_days <= 0:
        return 0  # kept forever
    before = now - timedelta(days=settings.worker_retention_days)
    try:
        url = queue.queue_url()
    except queue.NotPostgres:
        return 0  # no queue can live there
    with queue.connect(url) as conn:
        if conn.execute("SELECT to_regclass('scoring_jobs')").fetchone() == (None,):
            return 0
        return queue.purge(conn, before)


@flow(name="monitor", on_failure=[alert_on_new_failure])
def monitor() -> list[CheckResult]:
    """Check the system, update incident state, and alert on what opened or cleared; then delete
    jobs past their retention."""
    now = utc_now()
    results = run_checks(now)
    delivered, undelivered = update_incidents(results, now)
    log = get_run_logger()
    log.info("%d notification(s) sent; checks:\n%s", len(delivered), status_json(results))
    send_heartbeat(undelivered)
    purged = purge_finished_jobs(now)
    if purged:
        log.info("deleted %d job(s) finished before the retention period", purged)
    return results


if __name__ == "__main__":
    monitor()
