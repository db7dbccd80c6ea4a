"""Operational checks (queue, worker failures, sync and feature freshness) and incident state.

A check turns a measurement into a level ('ok', 'warning', 'critical', or 'unknown' when it could
not be measured) against thresholds from settings. Incidents live in the `monitor_incidents`
table of the queue database, so deduplication holds across runs and across processes: an alert
goes out when an incident opens (or escalates to critical), a RESOLVED notice when it clears, and
nothing while it lasts. It steps down (resolves, or back from critical to warning) only after
`clear_runs` measured runs in a row below its level, so a value flapping around a threshold stays
one incident (the monitor's PAYLATER_MONITOR_RESOLVE_AFTER_RUNS). An 'unknown' level leaves the incident as it is. A critical notice
pages (PagerDuty, under the incident's dedup key); the RESOLVED notice of an incident that
reached critical resolves that page, and so does the DE-ESCALATED notice of a critical incident
back at warning (which stays open, on Slack). A notice that was not delivered (no channel accepted it, or
PagerDuty refused the page with a retryable error) undoes its incident change, so the next run
sends it again.

A check the monitor cannot measure (its database or the Prefect API not answering; not a quiet
window with too few jobs to judge) is tracked apart, in `monitor_unmeasured`: unmeasured for
PAYLATER_MONITOR_UNKNOWN_ALERT_MINUTES, it sends one warning (Slack only: the heartbeat already
pages when the monitor itself cannot deliver), and a RESOLVED notice once it is measured again.
Its incident, if one is open, stays as it is meanwhile.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar
from uuid import UUID

import sqlalchemy as sa

from paylater.postgres import connect_timeout
from paylater.redaction import redact
from paylater.settings import Settings
from tasks.online import last_published

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).parent / "sql" / "monitoring"
LEVELS = ("ok", "warning", "critical")


@cache
def load_sql(name: str) -> str:
    """The text of tasks/sql/monitoring/<name>.sql."""
    return (SQL_DIR / f"{name}.sql").read_text()


@dataclass(frozen=True)
class Threshold:
    """Warning and critical levels of one check (a value at or above a level reaches it)."""

    warning: float
    critical: float
    unit: str


@dataclass(frozen=True)
class Measurement:
    """One measured value; `value` None when it could not be measured (`detail` says why)."""

    check: str
    value: float | None
    detail: str = ""
    # Measured, but on too little data to judge (a quiet window): unknown, yet not unmeasured.
    sparse: bool = False


@dataclass(frozen=True)
class CheckResult:
    """A measurement judged against its threshold."""

    check: str
    level: str  # 'ok' | 'warning' | 'critical' | 'unknown'
    value: float | None
    threshold: Threshold
    summary: str
    detail: str = ""  # what the measurement said (why it is unknown, when it is)
    sparse: bool = False  # see Measurement.sparse

    @property
    def unmeasured(self) -> bool:
        """Unknown because the measurement could not be taken (not for want of data)."""
        return self.level == "unknown" and not self.sparse


@dataclass(frozen=True)
class Notification:
    """What to send through tasks.alerts.notify."""

    subject: str
    body: str
    severity: str  # 'critical' (Slack + PagerDuty), 'warning' (Slack), 'info' (RESOLVED, Slack)
    dedup_key: str
    resolve_page: bool = False  # RESOLVED of an incident that paged: PagerDuty resolves dedup_key


# The settings behind each check's (warning, critical) levels; None: a fixed level.
THRESHOLD_SETTINGS: dict[str, tuple[str | None, str | None]] = {
    "queue_depth": ("monitor_queue_depth_warning", "monitor_queue_depth_critical"),
    "oldest_queued_age": (
        "monitor_oldest_queued_warning_seconds",
        "monitor_oldest_queued_critical_seconds",
    ),
    "failure_rate": ("monitor_failure_rate_warning", "monitor_failure_rate_critical"),
    "dead_letter_rate": ("monitor_dead_letter_rate_warning", "monitor_dead_letter_rate_critical"),
    "sync_age": ("monitor_sync_age_warning_hours", "monitor_sync_age_critical_hours"),
    "feature_build_age": (
        "monitor_feature_age_warning_hours",
        "monitor_feature_age_critical_hours",
    ),
    "crashed_flows": (None, "monitor_crashed_flows_critical"),
    "failed_flows": (None, "monitor_failed_flows_critical"),
    "late_flow_runs": (None, "monitor_late_runs_critical"),
    "stuck_flow_runs": (None, "monitor_stuck_runs_critical"),
    # A setting naming no deployment: a warning (Slack), never a page.
    "stuck_limit_keys": (None, None),
    "feature_psi_max": ("monitor_psi_warning", "monitor_psi_critical"),
    "score_psi": ("monitor_psi_warning", "monitor_psi_critical"),
}


def _env(field: str) -> str:
    """The environment variable of a settings field."""
    return f"PAYLATER_{field.upper()}"


def check_thresholds(limits: dict[str, Threshold]) -> None:
    """Refuse levels that cannot work: 0 < warning <= critical for every check.

    A level at or below 0 is reached by every value, so its incident never clears (a critical
    one pages for good: `crashed_flows = 0 flows (>= critical threshold 0)`); a warning above
    its critical never fires. Raised as one ValueError naming the settings to fix.
    """
    problems = []
    for check, limit in limits.items():
        warning_field, critical_field = THRESHOLD_SETTINGS[check]
        warning = _env(warning_field) if warning_field else "its fixed warning level"
        if critical_field is None:
            continue  # both levels fixed
        critical = _env(critical_field)
        if warning_field and not limit.warning > 0:
            problems.append(f"{warning} must be above 0")
        if not limit.critical > 0:
            problems.append(f"{critical} must be above 0")
        elif not limit.warning <= limit.critical:
            problems.append(
                f"{warning} ({format_value(limit.warning, limit.unit)}) must not exceed "
                f"{critical} ({format_value(limit.critical, limit.unit)})"
            )
    if problems:
        unique = list(dict.fromkeys(problems))  # the two PSI checks share their settings
        raise ValueError("monitoring thresholds: " + "; ".join(unique))


def thresholds(settings: Settings) -> dict[str, Threshold]:
    """Every check's thresholds, read from settings (hours shown as seconds internally);
    ValueError naming the settings when levels cannot work (see check_thresholds)."""
    s = settings
    limits = {
        "queue_depth": Threshold(
            s.monitor_queue_depth_warning, s.monitor_queue_depth_critical, "jobs"
        ),
        "oldest_queued_age": Threshold(
            s.monitor_oldest_queued_warning_seconds, s.monitor_oldest_queued_critical_seconds, "s"
        ),
        "failure_rate": Threshold(
            s.monitor_failure_rate_warning, s.monitor_failure_rate_critical, "ratio"
        ),
        "dead_letter_rate": Threshold(
            s.monitor_dead_letter_rate_warning, s.monitor_dead_letter_rate_critical, "ratio"
        ),
        "sync_age": Threshold(
            s.monitor_sync_age_warning_hours * 3600, s.monitor_sync_age_critical_hours * 3600, "s"
        ),
        "feature_build_age": Threshold(
            s.monitor_feature_age_warning_hours * 3600,
            s.monitor_feature_age_critical_hours * 3600,
            "s",
        ),
        "crashed_flows": Threshold(1, s.monitor_crashed_flows_critical, "flows"),
        "failed_flows": Threshold(1, s.monitor_failed_flows_critical, "flows"),
        "late_flow_runs": Threshold(1, s.monitor_late_runs_critical, "runs"),
        "stuck_flow_runs": Threshold(1, s.monitor_stuck_runs_critical, "runs"),
        "stuck_limit_keys": Threshold(1, math.inf, "keys"),
        "feature_psi_max": Threshold(s.monitor_psi_warning, s.monitor_psi_critical, "PSI"),
        "score_psi": Threshold(s.monitor_psi_warning, s.monitor_psi_critical, "PSI"),
    }
    check_thresholds(limits)
    return limits


def unknown_alert_after(settings: Settings) -> timedelta:
    """How long a check may stay unmeasured before its notice; ValueError naming the setting
    when it cannot work.

    0 (or less) is refused rather than read as "off" or "at once": off would bring back the
    silence this notice exists to end, and at once would turn every passing timeout into a
    Slack message. A large value (1440: a day) is the way to hear less.
    """
    field = "monitor_unknown_alert_minutes"
    minutes = getattr(settings, field)
    if not (math.isfinite(minutes) and minutes > 0):
        raise ValueError(
            f"monitoring thresholds: {_env(field)} must be a number of minutes above 0 (is "
            f"{minutes:g}): how long a check may go unmeasured before Slack is told"
        )
    return timedelta(minutes=minutes)


def resolve_after_runs(settings: Settings) -> int:
    """How many measured runs in a row below an incident's level step it down (hysteresis);
    ValueError naming the setting when it cannot work (below 1: nothing would ever resolve)."""
    field = "monitor_resolve_after_runs"
    runs = getattr(settings, field)
    if runs < 1:
        raise ValueError(
            f"monitoring thresholds: {_env(field)} must be 1 or more (is {runs}): the measured"
            " runs in a row below its level after which an incident resolves (1: at once)"
        )
    return int(runs)


# The windows the checks look through: (settings field, unit, what a value at or below 0 does).
WINDOW_SETTINGS = (
    (
        "monitor_window_minutes",
        "minutes",
        "no finished job falls in it, so the failure and dead-letter rates are never judged",
    ),
    (
        "monitor_flow_window_hours",
        "hours",
        "no flow run ends in it, so crashed and failed flows are never counted",
    ),
    (
        "monitor_late_run_minutes",
        "minutes",
        "a run counts as late the moment it is due (below 0: before it is due)",
    ),
    (
        "monitor_stuck_run_hours",
        "hours",
        "every running flow run counts as stuck the moment it starts",
    ),
)


def check_windows(settings: Settings) -> None:
    """Refuse windows that cannot work: each must be a finite number above 0 (ValueError naming
    the variables; the checks would otherwise stay silent, or page, for good)."""
    problems = []
    for name, unit, symptom in WINDOW_SETTINGS:
        value = float(getattr(settings, name))
        if not (math.isfinite(value) and value > 0):
            problems.append(
                f"{_env(name)} must be a number of {unit} above 0 (is {value:g}): at or below 0 "
                f"{symptom}"
            )
    problems += stuck_limit_problems(settings.monitor_stuck_run_hours_by_deployment)
    if problems:
        raise ValueError("monitoring thresholds: " + "; ".join(problems))


STUCK_LIMITS_SETTING = "monitor_stuck_run_hours_by_deployment"


def stuck_limit_problems(limits: Mapping[str, float]) -> list[str]:
    """What is wrong with the per-deployment stuck limits: each key a deployment's name (or
    'flow/deployment'), each value a finite number of hours above 0, like the global limit."""
    env = _env(STUCK_LIMITS_SETTING)
    problems = []
    for key, hours in limits.items():
        if not key.strip() or key != key.strip() or key.strip("/") != key:
            problems.append(
                f"{env} has the key {key!r}: name a deployment ('daily-sync') or a flow's"
                " deployment ('daily-sync/daily-sync'), without blanks around it"
            )
        elif not (math.isfinite(hours) and hours > 0):
            problems.append(
                f"{env}[{key!r}] must be a number of hours above 0 (is {hours:g}): at or below 0"
                " every run of it counts as stuck the moment it starts"
            )
    return problems


def format_value(value: float | None, unit: str) -> str:
    """A value for humans: seconds as minutes/hours, ratios as percent."""
    if value is None:
        return "unknown"
    if unit == "s":
        return f"{value / 3600:.1f} h" if value >= 3600 else f"{value:.0f} s"
    if unit == "ratio":
        return f"{value:.2%}"
    if unit == "PSI":
        return f"{value:.3f}"
    return f"{value:g} {unit}"


def evaluate(measurement: Measurement, threshold: Threshold) -> CheckResult:
    """Judge one measurement: the highest level whose threshold the value reaches."""
    value = measurement.value
    if value is None:
        level = "unknown"
    elif value >= threshold.critical:
        level = "critical"
    elif value >= threshold.warning:
        level = "warning"
    else:
        level = "ok"
    limit = {"critical": threshold.critical, "warning": threshold.warning}.get(level)
    summary = f"{measurement.check} = {format_value(value, threshold.unit)}"
    if limit is not None:
        summary += f" (>= {level} threshold {format_value(limit, threshold.unit)})"
    # A reason quotes its source's error, which may name a URL with its password (httpx's
    # does): everything downstream (log, incident table, alerts, dashboard) reads it from here.
    detail = redact(measurement.detail)
    if detail:
        summary += f"; {detail}"
    return CheckResult(
        measurement.check,
        level,
        value,
        threshold,
        summary,
        detail=detail,
        sparse=measurement.sparse,
    )


# --- measurements -------------------------------------------------------------------------


def sqlalchemy_url(url: str) -> str:
    """A database URL SQLAlchemy opens with psycopg 3 (postgresql://…) or the stdlib (sqlite:///…)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def open_queue_db(settings: Settings) -> sa.Engine:
    """The database holding the job queue and the incident table (the worker's queue database)."""
    url = sqlalchemy_url(settings.worker_database_url or settings.source)
    # A host that does not answer would otherwise hold every 5-minute run.
    connect_args = connect_timeout(url) if url.startswith("postgresql") else {}
    return sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args=connect_args)


QUEUE_CHECKS = ("queue_depth", "oldest_queued_age", "failure_rate", "dead_letter_rate")
"""The checks measure_queue answers, in its order."""

QUEUE_QUERY_TIMEOUT_SECONDS = 10.0
"""The queue statistics' query (a few index scans) gives up after this: the checks are unknown."""


def measure_queue(
    engine: sa.Engine, now: datetime, window_minutes: int, min_jobs: int
) -> list[Measurement]:
    """Queue depth, oldest runnable queued job's age, and failure/dead-letter rates over a window."""
    checks = QUEUE_CHECKS
    if engine.dialect.name != "postgresql":
        reason = (
            f"the queue database is {engine.dialect.name}, and the scoring queue needs PostgreSQL:"
            " set PAYLATER_WORKER_DATABASE_URL (or PAYLATER_SOURCE_URL) to a postgresql:// URL"
        )
        return [Measurement(c, None, reason) for c in checks]
    if not sa.inspect(engine).has_table("scoring_jobs"):
        return [Measurement(c, None, "no scoring_jobs table in the queue database") for c in checks]
    since = now - timedelta(minutes=window_minutes)
    try:
        with engine.connect() as conn:
            # A lock held on the table (a migration) must not hang the run and every run after it.
            timeout_ms = int(QUEUE_QUERY_TIMEOUT_SECONDS * 1000)
            conn.execute(sa.text(f"SET LOCAL statement_timeout = {timeout_ms}"))
            stats = conn.execute(sa.text(load_sql("queue_stats")), {"now": now, "since": since})
            row = stats.one()
    except sa.exc.OperationalError as exc:
        # Only the statement timeout is "no answer"; a session ended under the query (an
        # administrator, a failover, a lost connection) is told as such, not as a slow table.
        import psycopg

        cause = str(exc.orig).strip()
        if isinstance(exc.orig, psycopg.errors.QueryCanceled):
            reason = (
                f"the queue database did not answer within {QUEUE_QUERY_TIMEOUT_SECONDS:g} s:"
                f" {cause}"
            )
        else:
            reason = f"the queue database ended the stats query: {cause}"
        return [Measurement(c, None, reason) for c in checks]
    oldest = row.oldest_queued_at
    age = max(0.0, (now - as_utc(oldest)).total_seconds()) if oldest is not None else 0.0
    finished = int(row.finished_in_window or 0)
    window = f"{finished} jobs finished in the last {window_minutes} min"
    if finished == 0 or finished < min_jobs:  # min_jobs 0 would otherwise divide by zero
        reason = f"only {window} (< {max(min_jobs, 1)}): rate not judged"
        failure = Measurement("failure_rate", None, reason, sparse=True)
        dead = Measurement("dead_letter_rate", None, reason, sparse=True)
    else:
        failure = Measurement("failure_rate", int(row.failed_in_window) / finished, window)
        dead = Measurement("dead_letter_rate", int(row.dead_in_window) / finished, window)
    return [
        Measurement("queue_depth", float(row.queue_depth or 0)),
        Measurement("oldest_queued_age", age, "" if oldest is not None else "queue empty"),
        failure,
        dead,
    ]


def as_utc(moment: datetime | str) -> datetime:
    """A timestamp from PostgreSQL, SQLite (ISO text) or DuckDB as an aware UTC datetime."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def measure_sync_age(warehouse_url: str, now: datetime) -> Measurement:
    """Seconds since the newest fully successful sync (every configured table succeeded)."""
    from tasks.sync import configured_tables
    from tasks.warehouse import open_warehouse

    try:
        expected = {spec.name for spec in configured_tables()}
    except Exception as exc:
        return Measurement("sync_age", None, f"sync tables not readable: {exc}")
    try:
        warehouse = open_warehouse(warehouse_url)
    except Exception as exc:  # a warehouse busy with a sync must not crash the monitor
        return Measurement("sync_age", None, f"warehouse not readable: {exc}")
    try:
        if not warehouse.table_exists("sync_ledger"):
            return Measurement("sync_age", None, "no sync_ledger table yet (no sync has run)")
        days = warehouse.query_arrow(load_sql("sync_last_success")).to_pylist()
    except Exception as exc:  # a failing query (BigQuery error, a broken table) is not a crash
        return Measurement("sync_age", None, f"sync ledger not readable: {exc}")
    finally:
        warehouse.close()
    synced = (d for d in days if expected <= set((d["tables"] or "").split(",")))
    day = next(synced, None)
    if day is None or day["finished_at"] is None:
        return Measurement("sync_age", None, "no fully successful sync in the ledger")
    finished = as_utc(day["finished_at"])
    return Measurement(
        "sync_age",
        (now - finished).total_seconds(),
        f"last successful sync as_of {day['as_of']} finished {finished:%Y-%m-%d %H:%M} UTC",
    )


def measure_feature_age(
    newest_manifest: Callable[[], dict[str, Any] | None],
    now: datetime,
    published: Callable[[], Any] | None = None,
) -> Measurement:
    """Seconds since the features the service scores with were built: the newest scoring
    dataset's build time, or the online table's publish time when that is older (a build whose
    publish failed leaves the service on the previous day's features). `published` returns a
    tasks.online.Published, or None while nothing was published."""
    try:
        manifest = newest_manifest()
    except Exception as exc:
        return Measurement("feature_build_age", None, f"dataset manifests not readable: {exc}")
    if manifest is None:
        return Measurement("feature_build_age", None, "no scoring dataset built yet")
    built = manifest_built_at(manifest)
    if built is None:
        return Measurement("feature_build_age", None, "newest manifest has no build time")
    dataset = (
        f"newest scoring dataset as_of {manifest.get('as_of')} built {built:%Y-%m-%d %H:%M} UTC"
    )
    if published is None:
        return Measurement("feature_build_age", (now - built).total_seconds(), dataset)
    try:
        online = published()
    except Exception as exc:
        return Measurement("feature_build_age", None, f"online feature table not readable: {exc}")
    if online is None:
        return Measurement(
            "feature_build_age",
            None,
            f"{dataset}, but the online feature table holds nothing published: the publish failed",
        )
    at = as_utc(online.published_at)
    age = max(now - built, now - at).total_seconds()
    detail = f"online features as_of {online.as_of} published {at:%Y-%m-%d %H:%M} UTC; {dataset}"
    if online.as_of is not None and online.as_of.isoformat() < str(manifest.get("as_of")):
        detail += " (its publish failed: the service scores with the older features)"
    return Measurement("feature_build_age", age, detail)


def manifest_built_at(manifest: dict[str, Any]) -> datetime | None:
    """When a dataset was built: its created/built time, else its source watermark."""
    for key in ("created_at", "built_at", "written_at", "source_watermark"):
        value = manifest.get(key)
        if value:
            return as_utc(value if isinstance(value, datetime) else str(value))
    return None


@dataclass(frozen=True)
class FlowRunInfo:
    """What the flow-run checks need of one Prefect flow run."""

    flow: str  # the flow's name
    name: str  # the run's name
    state_type: str  # Prefect's StateType value: COMPLETED, CRASHED, SCHEDULED, ...
    message: str
    end_time: datetime | None
    # When it is due: a scheduled run's state's time (Prefect keeps expected_start_time from the
    # run's first state, so a run put back to Scheduled for later would look late), else that.
    expected_start_time: datetime | None
    deployment: str = ""  # the deployment's name ('' for an ad-hoc run)
    # When it entered its current state (a running run: since when it runs, this attempt).
    state_since: datetime | None = None


FLOW_RUN_CHECKS = (
    "crashed_flows",
    "failed_flows",
    "late_flow_runs",
    "stuck_flow_runs",
    "stuck_limit_keys",
)
"""The checks measure_flow_runs answers, in its order."""
TERMINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
FLOW_RUN_READ_TIMEOUT_SECONDS = 10.0
"""One Prefect API request of the flow-run checks, not retried: the next monitor run is the retry."""
FLOW_RUN_READ_BUDGET_SECONDS = 30.0
"""All of them: past it the checks are unknown, and the others are judged and alerted on."""
PREFECT_PAGE_SIZE = 200
"""Items asked of the Prefect API per request: its server refuses a larger limit
(PREFECT_SERVER_API_DEFAULT_LIMIT, 200 by default) and returns no more unasked."""


class _Identified(Protocol):
    """A Prefect object read from the API (a deployment, a flow run, a flow)."""

    @property
    def id(self) -> UUID: ...


Identified = TypeVar("Identified", bound=_Identified)


class _Timed(_Identified, Protocol):
    """A flow run read from the API, with the time it was first due (set once, never changed)."""

    @property
    def expected_start_time(self) -> datetime | None: ...


Timed = TypeVar("Timed", bound=_Timed)


def read_all_after(
    read: Callable[[int, datetime | None, list[UUID]], list[Timed]],
    in_time: Callable[[], None] = lambda: None,
) -> list[Timed]:
    """Every run `read(limit, after, exclude)` returns, PREFECT_PAGE_SIZE at a time until a short
    page: sorted by expected start time, each request asks from the last page's latest time on
    (`after`, inclusive), excluding the runs already read at that very time (`exclude`); `in_time`
    is called before each request (see read_all_excluding).

    A keyset, not offsets: Prefect sets a run's expected start time once, at its first state, so
    a run leaving the filtered states between two requests (a late run starting, a running one
    ending) moves no other run across a page's edge, and each run that stays is read exactly
    once. Each request excludes only the runs tied at the cursor, so it stays a page's size
    however many runs there are (see read_flow_runs for why not plain exclusion).
    """
    found: dict[UUID, Timed] = {}
    due: dict[UUID, datetime] = {}
    after: datetime | None = None
    while True:
        in_time()
        tied = [key for key, moment in due.items() if moment == after]
        page = read(PREFECT_PAGE_SIZE, after, tied)
        fresh = [item for item in page if item.id not in found]
        for item in fresh:
            if item.expected_start_time is None:  # Prefect sets it at a run's first state
                raise RuntimeError(f"the Prefect API returned flow run {item.id} with no due time")
            found[item.id], due[item.id] = item, as_utc(item.expected_start_time)
        if len(page) < PREFECT_PAGE_SIZE:
            return list(found.values())
        if not fresh:  # an API ignoring the filter would return this page forever
            raise RuntimeError("the Prefect API returned a full page of runs it was told to skip")
        after = max(due[item.id] for item in fresh)


def read_all_excluding(
    read: Callable[[int, list[UUID]], list[Identified]],
    key: Callable[[Identified], UUID],
    in_time: Callable[[], None] = lambda: None,
    excluded: Iterable[UUID] = (),
) -> dict[UUID, Identified]:
    """The first object `read(limit, exclude)` returns for each key, PREFECT_PAGE_SIZE at a time
    until a short page; `in_time` is called before each request (it raises when the read budget
    is spent).

    Each request asks again from the top, excluding the keys found so far (and `excluded`): no
    offset, so objects tied in the sort, or one deleted between two requests, cannot shift an
    object past a page's edge; and every object a page returns has its key excluded from the
    next, so each is read once (a key's first object is its first in the sort order).
    """
    found: dict[UUID, Identified] = {}
    skipped = set(excluded)
    while True:
        in_time()
        page = read(PREFECT_PAGE_SIZE, [*skipped, *found])
        fresh = False
        for item in page:
            if key(item) not in skipped and key(item) not in found:
                found[key(item)] = item
                fresh = True
        if len(page) < PREFECT_PAGE_SIZE:
            return found
        if not fresh:  # an API ignoring the exclusion would return this page forever
            raise RuntimeError(
                "the Prefect API returned a full page of objects it was told to skip"
            )


WAITING_STATES = ("SCHEDULED", "PENDING")
RUNNING_STATES = ("RUNNING", "CANCELLING")
"""States a run leaves only by a report from its process (or its worker): a process that died
unseen leaves the run in them for good. CANCELLING too: a cancel whose worker is gone."""


def _listed(runs: list[FlowRunInfo], describe: Callable[[FlowRunInfo], str]) -> str:
    """The first five runs described, and how many more there are."""
    shown = "; ".join(describe(r) for r in runs[:5])
    return shown + (f"; and {len(runs) - 5} more" if len(runs) > 5 else "")


def _latest_ended(latest: Iterable[FlowRunInfo], state: str, check: str) -> Measurement:
    """Jobs whose latest finished run ended in `state`, oldest first."""
    ended = sorted(
        (r for r in latest if r.state_type == state),
        key=lambda r: r.end_time or datetime.min.replace(tzinfo=UTC),
    )
    verb = state.lower()

    def describe(r: FlowRunInfo) -> str:
        when = f" at {as_utc(r.end_time):%Y-%m-%d %H:%M} UTC" if r.end_time else ""
        return f"{r.flow}/{r.name} {verb}{when}: {(r.message or 'no message')[:200]}"

    return Measurement(check, float(len(ended)), _listed(ended, describe))


def measure_crashed_flows(latest: Iterable[FlowRunInfo]) -> Measurement:
    """Jobs whose latest finished run crashed, from each job's latest finished run.

    A crash is a process that died before its flow could report (killed, out of memory, a native
    abort in a driver): no on_failure hook ran, so nobody was told. It counts until a later run of
    the same job finishes, whatever that run's outcome.
    """
    return _latest_ended(latest, "CRASHED", "crashed_flows")


def measure_failed_flows(latest: Iterable[FlowRunInfo]) -> Measurement:
    """Jobs whose latest finished run failed (after its retries), from each job's latest run.

    The run's on_failure hook told the chat channels once, with the error; this check is what
    pages (failures page someone) and what resolves the page once a later run of the same job
    finishes, whatever that run's outcome.
    """
    return _latest_ended(latest, "FAILED", "failed_flows")


def _overdue(
    runs: Iterable[FlowRunInfo],
    states: tuple[str, ...],
    since: Callable[[FlowRunInfo], datetime | None],
    cutoff: datetime,
) -> list[FlowRunInfo]:
    """The runs in one of `states` whose `since` time is at or before `cutoff`, oldest first."""
    found = [
        (as_utc(when), r)
        for r in runs
        if r.state_type in states and (when := since(r)) is not None and as_utc(when) <= cutoff
    ]
    return [r for _, r in sorted(found, key=lambda pair: pair[0])]


def measure_late_runs(
    waiting: Iterable[FlowRunInfo], now: datetime, late_minutes: float
) -> Measurement:
    """Flow runs still waiting `late_minutes` after their scheduled start: no worker takes them."""
    cutoff = now - timedelta(minutes=late_minutes)
    late = _overdue(waiting, WAITING_STATES, lambda r: r.expected_start_time, cutoff)

    def describe(r: FlowRunInfo) -> str:
        due = as_utc(r.expected_start_time or cutoff)
        return f"{r.flow}/{r.name} due {due:%Y-%m-%d %H:%M} UTC"

    detail = _listed(late, describe)
    if late:
        detail += " (is a worker polling the work pool?)"
    return Measurement("late_flow_runs", float(len(late)), detail)


def stuck_limit_hours(run: FlowRunInfo, default_hours: float, limits: Mapping[str, float]) -> float:
    """How long `run` may run before it is stuck: its 'flow/deployment' limit, else its
    deployment name's, else the global one."""
    for key in (f"{run.flow}/{run.deployment}", run.deployment):
        if run.deployment and key in limits:
            return float(limits[key])
    return default_hours


def measure_stuck_runs(
    running: Iterable[FlowRunInfo],
    now: datetime,
    stuck_hours: float,
    limits: Mapping[str, float] | None = None,
) -> Measurement:
    """Deployment runs RUNNING (or CANCELLING) past their limit, longest first: `limits`' hours
    for their deployment (see stuck_limit_hours), else `stuck_hours`.

    A run whose process vanished without a word (its host lost, an OOM kill of the whole
    machine, a hang) is never reported Crashed: it stays RUNNING, so the crashed, failed and late
    checks never see it, and its job silently stops producing.
    """
    limits = limits or {}

    def hours(r: FlowRunInfo) -> float:
        return stuck_limit_hours(r, stuck_hours, limits)

    stuck = [
        r
        for r in _overdue(running, RUNNING_STATES, lambda r: r.state_since, now)
        if r.state_since is not None and as_utc(r.state_since) <= now - timedelta(hours=hours(r))
    ]

    def describe(r: FlowRunInfo) -> str:
        since = as_utc(r.state_since or now)
        lasted = format_value((now - since).total_seconds(), "s")
        state = "" if r.state_type == "RUNNING" else f" ({r.state_type})"
        return (
            f"{r.flow}/{r.name} (deployment {r.deployment or 'none'}) running{state} since"
            f" {since:%Y-%m-%d %H:%M} UTC, for {lasted} (limit {format_value(hours(r) * 3600, 's')})"
        )

    return Measurement("stuck_flow_runs", float(len(stuck)), _listed(stuck, describe))


def measure_stuck_limit_keys(
    limits: Mapping[str, float], deployments: Iterable[str], stuck_hours: float
) -> Measurement:
    """Keys of the per-deployment stuck limits that name no deployment (`deployments`: each
    'flow/deployment'): a mistyped one ('daily_sync') would leave its job on the global limit
    without a word, too lax to catch its hang or strict enough to page a long run."""
    names = sorted(set(deployments))
    known = set(names) | {name.partition("/")[2] for name in names}
    unknown = [key for key in limits if key not in known]
    if not unknown:
        return Measurement("stuck_limit_keys", 0.0)
    listed = ", ".join(names) if names else "none"
    detail = (
        f"{_env(STUCK_LIMITS_SETTING)} names no deployment of the Prefect API:"
        f" {', '.join(repr(k) for k in unknown)} (ignored: those jobs keep the global limit,"
        f" {format_value(stuck_hours * 3600, 's')}); deployments: {listed}"
    )
    return Measurement("stuck_limit_keys", float(len(unknown)), detail)


def current_flow_run_id() -> str | None:
    """The flow run this code runs in (None outside one)."""
    try:
        from prefect.runtime import flow_run

        found = flow_run.id
    except Exception:
        return None
    return str(found) if found else None


def current_deployment_id() -> str | None:
    """The deployment of the flow run this code runs in (None outside one, or when unknown)."""
    try:
        from prefect.runtime import deployment

        found = deployment.id
    except Exception:  # the API asked for it and did not answer: then nothing is skipped
        return None
    return str(found) if found else None


def _sort_time(moment: datetime | None) -> datetime:
    """A run's time to sort by, aware; none: first."""
    return as_utc(moment) if moment is not None else datetime.min.replace(tzinfo=UTC)


class FlowRuns(NamedTuple):
    """What read_flow_runs read from the Prefect API."""

    latest: list[FlowRunInfo]  # each deployment's newest run finished in the window
    waiting: list[FlowRunInfo]  # runs waiting past their start
    running: list[FlowRunInfo]  # deployment runs running now, oldest first
    deployments: list[str]  # every deployment, as 'flow/deployment'


def read_flow_runs(
    now: datetime,
    window_hours: float,
    late_minutes: float,
    own_deployment: str | None = None,
    own_run: str | None = None,
) -> FlowRuns:
    """From the Prefect API: the latest run of every deployment that finished in the window, the
    runs waiting past their start by `late_minutes`, the deployment runs running now (oldest
    first; `own_run`, the run measuring, left out: it is running, and is not what is stuck), and
    the name of every deployment (what the per-deployment stuck limits may name).

    `own_deployment` (the monitor's, when it runs as one) is left out of the finished runs: the
    run now measuring shows that job runs again, so its previous run's failure is over; judged,
    one transient failure of the monitor paged at its next run and resolved at the one after.

    Only deployment runs count: the jobs the system runs. An ad-hoc run interrupted or failing on
    someone's terminal is Crashed or Failed too, and no later deployment run would ever clear it.

    The finished runs are read newest first, a page at a time, each page excluding the
    deployments already found (see read_all_excluding): a job that fails every 5 minutes (the
    monitor itself, while its database is down) fills at most one page before it is excluded, so
    it never crowds another job's failure out; and the read costs about a request per page of
    jobs (PREFECT_PAGE_SIZE), at most one per page of finished runs, not one per deployment (with
    hundreds, the reads outlasted their budget). The deployments are read the same way. The
    waiting and running runs are read by a keyset on their expected start time (see
    read_all_after), not by offset: a run changing state between two pages shifted the offsets,
    and the run at a page's edge went unread for a pass. Not by exclusion either: those runs
    pile up by the thousand when no worker polls (the monitor's own schedule alone adds 288 late
    runs a day), and each request would carry every id read so far. An API that does not answer raises
    TimeoutError within about FLOW_RUN_READ_BUDGET_SECONDS (each request
    FLOW_RUN_READ_TIMEOUT_SECONDS, without the client's retries).
    """
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowFilter,
        FlowFilterId,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterEndTime,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import FlowRun, StateType
    from prefect.client.schemas.sorting import DeploymentSort, FlowRunSort
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    deadline = time.monotonic() + FLOW_RUN_READ_BUDGET_SECONDS

    def in_time() -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow runs not read within {FLOW_RUN_READ_BUDGET_SECONDS:.0f} s")

    def states(*names: str) -> FlowRunFilterState:
        return FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(n) for n in names]))

    with (
        temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}),
        get_client(
            httpx_settings={"timeout": FLOW_RUN_READ_TIMEOUT_SECONDS}, sync_client=True
        ) as client,
    ):

        def deployment_of(run: FlowRun) -> UUID:
            if run.deployment_id is None:  # asked for with deployment_id is_null_=False
                raise RuntimeError(f"the Prefect API returned flow run {run.id} with no deployment")
            return run.deployment_id

        def excluding(ids: list[UUID]) -> DeploymentFilter:
            return DeploymentFilter(id=DeploymentFilterId(not_any_=ids or None))

        # Every deployment, not the API's first page: a job past it went unjudged (its failures
        # never paged) and a stuck limit naming it was reported as naming no deployment. Sorted
        # by name alone (the API has no other stable order), so paged by exclusion, not offset.
        deployments = list(
            read_all_excluding(
                lambda limit, skip: client.read_deployments(
                    deployment_filter=excluding(skip), sort=DeploymentSort.NAME_ASC, limit=limit
                ),
                lambda d: d.id,
                in_time,
            ).values()
        )
        # Each deployment's newest finished run: the monitor's own deployment is left out by the
        # server, so its ~600 runs of a 48 h window never cost a page. The deployment filter
        # also keeps to runs of deployments that exist, as the deployments read above.
        latest = read_all_excluding(
            lambda limit, skip: client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=states(*TERMINAL_STATES),
                    deployment_id=FlowRunFilterDeploymentId(is_null_=False),
                    end_time=FlowRunFilterEndTime.model_validate(
                        {"after_": now - timedelta(hours=window_hours)}
                    ),
                ),
                deployment_filter=excluding(skip),
                sort=FlowRunSort.END_TIME_DESC,
                limit=limit,
            ),
            deployment_of,
            in_time,
            excluded=[UUID(own_deployment)] if own_deployment else [],
        )

        def runs(
            state: FlowRunFilterState,
            before: datetime | None = None,
            skip: list[UUID] | None = None,
            deployment_id: FlowRunFilterDeploymentId | None = None,
        ) -> list[FlowRun]:
            def page(limit: int, after: datetime | None, tied: list[UUID]) -> list[FlowRun]:
                due = {"before_": before, "after_": after}
                return client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(not_any_=[*(skip or []), *tied] or None),
                        state=state,
                        deployment_id=deployment_id,
                        expected_start_time=FlowRunFilterExpectedStartTime.model_validate(due),
                    ),
                    sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                    limit=limit,
                )

            return read_all_after(page, in_time)

        waiting = runs(states(*WAITING_STATES), before=now - timedelta(minutes=late_minutes))
        running = runs(
            states(*RUNNING_STATES),
            skip=[UUID(own_run)] if own_run else None,
            deployment_id=FlowRunFilterDeploymentId(is_null_=False),
        )
        waiting.sort(key=lambda r: _sort_time(r.expected_start_time))
        running.sort(key=lambda r: _sort_time(r.start_time or r.expected_start_time))
        flow_ids = list(
            {r.flow_id for r in [*latest.values(), *waiting, *running]}
            | {d.flow_id for d in deployments}
        )
        flows = []
        for start in range(0, len(flow_ids), PREFECT_PAGE_SIZE):  # a page of ids per request
            in_time()
            chunk = flow_ids[start : start + PREFECT_PAGE_SIZE]
            flows += client.read_flows(
                flow_filter=FlowFilter(id=FlowFilterId(any_=chunk)), limit=len(chunk)
            )
        names = {f.id: f.name for f in flows}
    deployment_names = {d.id: d.name for d in deployments}

    def info(run: FlowRun) -> FlowRunInfo:
        state = run.state
        due = run.expected_start_time
        if state is not None and state.type == StateType.SCHEDULED:
            due = state.state_details.scheduled_time or due  # AwaitingRetry, rescheduled
        return FlowRunInfo(
            flow=names.get(run.flow_id, str(run.flow_id)),
            name=run.name,
            state_type=state.type.value if state else "UNKNOWN",
            message=(state.message or "") if state else "",
            end_time=run.end_time,
            expected_start_time=due,
            deployment=deployment_names.get(run.deployment_id, "") if run.deployment_id else "",
            state_since=state.timestamp if state else None,
        )

    return FlowRuns(
        [info(r) for r in latest.values()],
        [info(r) for r in waiting],
        [info(r) for r in running],
        [f"{names.get(d.flow_id, d.flow_id)}/{d.name}" for d in deployments],
    )


def measure_flow_runs(settings: Settings, now: datetime) -> list[Measurement]:
    """Crashed and failed jobs, late and stuck runs, per-deployment stuck limits naming no
    deployment, from the Prefect API (unknown when it cannot be read)."""
    try:
        latest, waiting, running, deployments = read_flow_runs(
            now,
            settings.monitor_flow_window_hours,
            settings.monitor_late_run_minutes,
            own_deployment=current_deployment_id(),
            own_run=current_flow_run_id(),
        )
    except Exception as exc:  # the API down must not stop the other checks
        reason = f"Prefect API not readable: {type(exc).__name__}: {exc}"
        return [
            Measurement("crashed_flows", None, reason),
            Measurement("failed_flows", None, reason),
            Measurement("late_flow_runs", None, reason),
            Measurement("stuck_flow_runs", None, reason),
            Measurement("stuck_limit_keys", None, reason),
        ]
    return [
        measure_crashed_flows(latest),
        measure_failed_flows(latest),
        measure_late_runs(waiting, now, settings.monitor_late_run_minutes),
        measure_stuck_runs(
            running,
            now,
            settings.monitor_stuck_run_hours,
            settings.monitor_stuck_run_hours_by_deployment,
        ),
        measure_stuck_limit_keys(
            settings.monitor_stuck_run_hours_by_deployment,
            deployments,
            settings.monitor_stuck_run_hours,
        ),
    ]


# --- incidents ----------------------------------------------------------------------------


INCIDENT_COLUMNS = {
    "runs_ok": "integer NOT NULL DEFAULT 0",
    "runs_below_critical": "integer NOT NULL DEFAULT 0",
    "counted_day": "date",
}
"""Columns monitor_incidents gained after its first version (the hysteresis counters, and the
data day a drift incident last counted); an older table gets them added (counters at 0, no day)."""


def ensure_incident_table(engine: sa.Engine) -> None:
    """Create monitor_incidents, monitor_unmeasured and monitor_judged_days when missing; add
    the columns of INCIDENT_COLUMNS to an incident table made before them (its open incidents
    then start counting at 0, and count their next report whatever its day)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # a monitor racing this one waits, then finds them
            conn.execute(sa.text(load_sql("incidents_ddl_lock")))
        conn.execute(sa.text(load_sql("incidents_ddl")))
        conn.execute(sa.text(load_sql("unmeasured_ddl")))
        conn.execute(sa.text(load_sql("judged_days_ddl")))
        present = {c["name"] for c in sa.inspect(conn).get_columns("monitor_incidents")}
        # IF NOT EXISTS: a monitor racing this one may add them first (SQLite lacks it, and
        # runs one writer at a time).
        guard = "IF NOT EXISTS " if conn.dialect.name == "postgresql" else ""
        for column, definition in INCIDENT_COLUMNS.items():
            if column not in present:
                conn.execute(
                    sa.text(
                        f"ALTER TABLE monitor_incidents ADD COLUMN {guard}{column} {definition}"
                    )
                )


def open_incidents(engine: sa.Engine) -> list[dict[str, Any]]:
    """Every open incident, as dicts."""
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(load_sql("incidents_open")))]


def unmeasured_checks(engine: sa.Engine) -> list[dict[str, Any]]:
    """Every check the monitor cannot measure now, as dicts."""
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(load_sql("unmeasured_all")))]


def dedup_key(check: str) -> str:
    """The key an incident keeps in PagerDuty/Slack from opening to resolution."""
    return f"paylater-monitor/{check}"


def unmeasured_dedup_key(check: str) -> str:
    """The key of a check's unmeasured notices: never its incident's, so that resolving one
    cannot resolve the other (nor its page)."""
    return f"{dedup_key(check)}/unmeasured"


def reconcile(
    engine: sa.Engine,
    results: Iterable[CheckResult],
    now: datetime,
    deliver: Callable[[Notification], bool] | None = None,
    clear_runs: int = 1,
    data_day: date | None = None,
    admit: Callable[[CheckResult, dict[str, Any] | None], bool] | None = None,
) -> list[Notification]:
    """Update incident state from check results; return the notifications this run owes.

    An incident opens, or escalates to critical, at the first run that measures its level; it
    steps down only once `clear_runs` measured runs in a row stayed below its level (its level is
    then the highest of those runs): critical back to warning resolves its page, ok resolves it.
    A value flapping around a threshold thus keeps one incident, instead of paging and resolving
    every run. Unknown results neither count nor break a streak.

    With `deliver`, each notification is sent inside the transaction that changed its incident,
    and a delivery that fails (webhook down, PagerDuty 429/5xx) rolls that change back, so the
    next run sends it again instead of the incident lasting unannounced (or unpaged); only
    delivered ones are returned.

    `data_day`: the day of the data judged (a monitoring report's snapshot), kept on each
    incident as `counted_day`, so a rerun on the same day can be told apart (see
    tasks.dashboard.not_yet_counted), and in monitor_judged_days: a check already judged on a
    later day is left as it is (a backfill's old day neither opens, counts toward nor escalates
    an incident); None for the monitor's checks, which judge the present.
    `admit(result, incident)`: whether `result` counts, given its incident as it stands (a dict
    of monitor_incidents' columns, None when none is open); read under the check's lock.

    Each check's read-evaluate-write holds a PostgreSQL advisory lock on that check for its
    transaction, so monitors that overlap (a manual run beside the scheduled one, a slow run
    beside the next) leave the incidents, and send the notices, of the same runs one after the
    other: a run that read the incident first cannot decide on what the other is changing.
    """
    owed: list[Notification] = []
    for result in results:
        if result.level == "unknown":
            continue
        with engine.connect() as conn, conn.begin() as transaction:
            incident = _locked_incident(conn, result.check, read=admit is not None)
            if data_day is not None and _judged_later(conn, result.check, data_day):
                continue  # a backfill: a later day was judged, with or without an incident
            if admit is not None and not admit(result, incident):
                continue
            notice = _incident_change(conn, result, now, clear_runs, data_day)
            if notice is None:
                continue
            if deliver is not None and not deliver(notice):
                log.warning(
                    "%r not delivered: incident change undone, next run retries", notice.subject
                )
                transaction.rollback()
                continue
            owed.append(notice)
    return owed


def _locked_incident(conn: sa.Connection, check: str, read: bool) -> dict[str, Any] | None:
    """Take `check`'s incident lock for this transaction (PostgreSQL; SQLite runs one writer at a
    time); with `read`, its open incident as it stands now (None: none)."""
    params = {"check_name": check}
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(load_sql("incident_lock")), params)
    if not read:
        return None
    row = conn.execute(sa.text(load_sql("incident_get")), params).first()
    return dict(row._mapping) if row is not None else None


def _incident_change(
    conn: sa.Connection,
    result: CheckResult,
    now: datetime,
    clear_runs: int,
    data_day: date | None = None,
) -> Notification | None:
    """Record one measured result in monitor_incidents; the notice it owes, if any."""
    params = {
        "check_name": result.check,
        "severity": result.level,
        "value": result.value,
        "summary": result.summary,
        "now": now,
        "data_day": data_day,
    }
    opening = result.level != "ok"
    if opening and conn.execute(sa.text(load_sql("incident_open")), params).first() is not None:
        return firing_notice(result)
    incident = conn.execute(sa.text(load_sql("incident_step")), params).first()
    if incident is None:
        return None  # ok, and nothing open (or a racing monitor just resolved it)
    if result.level == "critical":
        if incident.peak_severity == "critical":
            return None
        conn.execute(sa.text(load_sql("incident_set_level")), {**params, "level": "critical"})
        return firing_notice(result, escalated=True)
    if incident.runs_ok >= clear_runs:
        conn.execute(sa.text(load_sql("incident_resolve")), params)
        paged = incident.peak_severity == "critical"
        return resolved_notice(result, as_utc(incident.opened_at), now, paged)
    if incident.peak_severity == "critical" and incident.runs_below_critical >= clear_runs:
        conn.execute(sa.text(load_sql("incident_set_level")), {**params, "level": "warning"})
        return deescalated_notice(result)
    return None


def reconcile_unmeasured(
    engine: sa.Engine,
    results: Iterable[CheckResult],
    now: datetime,
    after: timedelta,
    deliver: Callable[[Notification], bool] | None = None,
    data_day: date | None = None,
) -> list[Notification]:
    """Track the checks that could not be measured; return the notifications this run owes.

    A check unmeasured since a run at least `after` ago gets one warning; the first run that
    measures it again (any level, or too few jobs to judge: its source answered) ends the
    stretch, with a RESOLVED notice when the warning went out. Incidents are not touched.
    `deliver` as for `reconcile`: a notice not delivered undoes its change, the next run resends.

    `data_day`: the day of the data judged (a monitoring report's snapshot; None for the
    monitor's checks, which judge the present). A check already judged on a later day is left
    as it is: a backfill's old day, measured or not, says nothing of the present one.
    """
    owed: list[Notification] = []
    with engine.connect() as conn:  # one connection, a transaction per check
        for result in results:
            with conn.begin() as transaction:
                if data_day is not None and _judged_later(conn, result.check, data_day):
                    continue
                notice = _unmeasured_change(conn, result, now, after)
                if notice is None:
                    continue
                if deliver is not None and not deliver(notice):
                    log.warning(
                        "%r not delivered: unmeasured state undone, next run retries",
                        notice.subject,
                    )
                    transaction.rollback()
                    continue
                owed.append(notice)
    return owed


def _judged_later(conn: sa.Connection, check: str, data_day: date) -> bool:
    """Note that `check` was judged on `data_day`; whether a later day was judged already."""
    params = {"check_name": check, "data_day": data_day}
    newest = conn.execute(sa.text(load_sql("judged_day_note")), params).scalar_one()
    if _as_date(newest) > data_day:
        log.info("%s of %s left as it is: %s was judged already", check, data_day, newest)
        return True
    return False


def _as_date(value: date | str) -> date:
    """A date as read back (a date; ISO text from SQLite)."""
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def _unmeasured_change(
    conn: sa.Connection, result: CheckResult, now: datetime, after: timedelta
) -> Notification | None:
    """Record this run's view of one check in monitor_unmeasured; the notice it owes, if any."""
    params = {"check_name": result.check, "reason": result.detail or result.summary, "now": now}
    if not result.unmeasured:
        ended = conn.execute(sa.text(load_sql("unmeasured_end")), params).first()
        if ended is None or ended.notified_at is None:
            return None  # nothing was said: nothing to resolve
        return measured_again_notice(result, as_utc(ended.since), now)
    seen = conn.execute(sa.text(load_sql("unmeasured_seen")), params).one()
    since = as_utc(seen.since)
    if seen.notified_at is not None or now - since < after:
        return None
    # Whichever monitor's UPDATE wins tells; a racing one finds notified_at set.
    if conn.execute(sa.text(load_sql("unmeasured_notify")), params).first() is None:
        return None
    incident = conn.execute(sa.text(load_sql("incident_of")), params).first()
    return unmeasured_notice(result, since, now, incident)


RUNBOOK = "docs/runbook.md"
"""The on-call runbook, relative to the repository: one section per check, anchored by its name."""


def runbook_ref(check: str) -> str:
    """Where the runbook tells what `check` means and what to do (its section's anchor)."""
    return f"{RUNBOOK}#{check}"


def firing_notice(result: CheckResult, escalated: bool = False) -> Notification:
    """The alert sent when an incident opens or escalates; its last line points at the runbook."""
    tag = "ESCALATED" if escalated else "FIRING"
    return Notification(
        subject=f"[{tag}] paylater {result.level}: {result.check}",
        body=f"{result.summary}\nrunbook: {runbook_ref(result.check)}",
        severity=result.level,
        dedup_key=dedup_key(result.check),
    )


def deescalated_notice(result: CheckResult) -> Notification:
    """The notice sent when a critical incident falls back to warning: its page is resolved
    (a warning wakes nobody), the incident stays open on Slack."""
    return Notification(
        subject=f"[DE-ESCALATED] paylater warning: {result.check}",
        body=(
            f"{result.summary}\nno longer critical: its PagerDuty page is resolved, the"
            f" warning stays open here\nrunbook: {runbook_ref(result.check)}"
        ),
        severity="warning",
        dedup_key=dedup_key(result.check),
        resolve_page=True,
    )


def resolved_notice(
    result: CheckResult, opened_at: datetime, now: datetime, paged: bool = False
) -> Notification:
    """The notice sent once when an incident clears (resolving its page when it paged)."""
    lasted = max(0.0, (now - opened_at).total_seconds())
    return Notification(
        subject=f"[RESOLVED] paylater: {result.check}",
        body=f"{result.summary}; open for {format_value(lasted, 's')}",
        severity="info",
        dedup_key=dedup_key(result.check),
        resolve_page=paged,
    )


UNMEASURED_SECTION = "check_unmeasured"
"""The runbook section of every unmeasured notice (one for all checks: the cause is the source
that did not answer, which the notice quotes, not the check)."""


def unmeasured_notice(
    result: CheckResult, since: datetime, now: datetime, incident: Any = None
) -> Notification:
    """The warning that a check has not been measured since `since`, quoting why; it names the
    check's open incident (`incident`: a row with severity and opened_at), which stays open."""
    lasted = format_value(max(0.0, (now - since).total_seconds()), "s")
    lines = [
        f"{result.check} not measured since {since:%Y-%m-%d %H:%M} UTC ({lasted}): "
        f"{result.detail or result.summary}"
    ]
    if incident is not None:
        opened = as_utc(incident.opened_at)
        lines.append(
            f"its {incident.severity} incident (open since {opened:%Y-%m-%d %H:%M} UTC) stays"
            " open until the check is measured again"
        )
    lines.append(f"runbook: {RUNBOOK}#{UNMEASURED_SECTION}")
    return Notification(
        subject=f"[UNMEASURED] paylater warning: {result.check}",
        body="\n".join(lines),
        severity="warning",
        dedup_key=unmeasured_dedup_key(result.check),
    )


def measured_again_notice(result: CheckResult, since: datetime, now: datetime) -> Notification:
    """The notice that a check announced as unmeasured is measured again (Slack; never a page)."""
    lasted = format_value(max(0.0, (now - since).total_seconds()), "s")
    return Notification(
        subject=f"[RESOLVED] paylater: {result.check} measured again",
        body=f"{result.summary}; not measured for {lasted}",
        severity="info",
        dedup_key=unmeasured_dedup_key(result.check),
    )


def status_json(results: Iterable[CheckResult]) -> str:
    """Check results as JSON (for logs and artifacts)."""
    return json.dumps(
        [
            {"check": r.check, "level": r.level, "value": r.value, "summary": r.summary}
            for r in results
        ],
        indent=1,
    )


def utc_now() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


def newest_scoring_manifest(settings: Settings) -> dict[str, Any] | None:
    """The manifest of the newest complete scoring dataset, as a dict (None when there is none)."""
    from dataclasses import asdict

    from tasks.datasets import available_as_ofs, read_manifest
    from tasks.storage import open_storage

    storage = open_storage(settings.datasets, settings)
    dates = available_as_ofs(storage, "scoring")
    return asdict(read_manifest(storage, "scoring", dates[-1])) if dates else None


def _guarded(
    checks: tuple[str, ...], measure: Callable[[], list[Measurement]]
) -> list[Measurement]:
    """`measure()`, or its checks unknown (saying why) when it raises: one data source down must
    not keep the others from being judged and alerted on."""
    try:
        return measure()
    except Exception as exc:
        log.exception("measuring %s failed", ", ".join(checks))
        reason = f"not measured: {type(exc).__name__}: {exc}"
        return [Measurement(check, None, reason) for check in checks]


def measure_all(settings: Settings, engine: sa.Engine, now: datetime) -> list[Measurement]:
    """Every operational measurement the monitor judges (unknown where a measurement failed)."""
    return [
        *_guarded(
            QUEUE_CHECKS,
            lambda: measure_queue(
                engine, now, settings.monitor_window_minutes, settings.monitor_min_jobs
            ),
        ),
        *_guarded(("sync_age",), lambda: [measure_sync_age(settings.warehouse, now)]),
        *_guarded(
            ("feature_build_age",),
            lambda: [
                measure_feature_age(
                    lambda: newest_scoring_manifest(settings),
                    now,
                    lambda: last_published(settings=settings),
                )
            ],
        ),
        *_guarded(
            FLOW_RUN_CHECKS,
            lambda: measure_flow_runs(settings, now),
        ),
    ]


def judge(measurements: Iterable[Measurement], settings: Settings) -> list[CheckResult]:
    """Evaluate each measurement against its configured thresholds."""
    limits = thresholds(settings)
    return [evaluate(m, limits[m.check]) for m in measurements]
