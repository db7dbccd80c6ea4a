"""The monitoring dashboard: one self-contained HTML file with inline SVG plots (no CDN, no JS).

Plots (each an <svg> inside <figure id="plot-…">): score distribution over time, approval rate,
PSI per feature, queue latency, vintage AUC. Data comes from the queue database (scoring_results,
scoring_jobs) and the warehouse tables the daily drift run writes (monitoring_drift,
monitoring_vintage). Gathering and rendering are separate so rendering is a pure function.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from paylater.settings import Settings
from tasks.drift import (
    MIN_JUDGED_ROWS,
    DriftReport,
    Vintage,
    drift_report,
    drift_rows,
    model_scores,
    numeric_features,
    production_model,
    production_vintages,
    vintage_rows,
)
from tasks.monitoring import (
    LEVELS,
    CheckResult,
    Measurement,
    as_utc,
    load_sql,
    open_incidents,
)
from tasks.storage import LocalStorage

PLOT_IDS = (
    "plot-score-distribution",
    "plot-approval-rate",
    "plot-psi",
    "plot-queue-latency",
    "plot-vintage-auc",
)


@dataclass
class DashboardData:
    """Everything the dashboard shows, already aggregated."""

    generated_at: datetime
    daily: list[dict[str, Any]] = field(default_factory=list)  # dashboard_daily.sql rows
    psi: list[dict[str, Any]] = field(default_factory=list)  # feature, psi (newest drift run)
    vintages: list[dict[str, Any]] = field(default_factory=list)  # vintage_latest.sql rows
    incidents: list[dict[str, Any]] = field(default_factory=list)  # open monitor_incidents
    psi_warning: float = 0.10
    psi_critical: float = 0.25
    notes: list[str] = field(default_factory=list)


def daily_scoring(engine: sa.Engine, days: int, tz: str, now: datetime) -> list[dict[str, Any]]:
    """Per business day: volume, score quantiles, approval rate, latency (empty without a queue)."""
    if not sa.inspect(engine).has_table("scoring_results"):
        return []
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(load_sql("dashboard_daily")), {"since": now - timedelta(days=days), "tz": tz}
        )
        return [dict(r._mapping) for r in rows]


def warehouse_rows(warehouse: Any, table: str, sql_name: str) -> list[dict[str, Any]]:
    """Rows of one of the monitoring tables in the warehouse ([] until the first daily run)."""
    if not warehouse.table_exists(table):
        return []
    return list(warehouse.query_arrow(load_sql(sql_name)).to_pylist())


# --- rendering ------------------------------------------------------------------------------


def _figure(title: str) -> tuple[Any, Any]:
    """A small matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=100)
    ax.set_title(title, fontsize=11, loc="left")
    ax.grid(alpha=0.3)
    return fig, ax


def _svg(fig: Any, plot_id: str) -> str:
    """The figure as inline SVG markup whose root element carries `plot_id`-svg."""
    import matplotlib
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.id": f"{plot_id}-svg"}):
        fig.tight_layout()
        fig.savefig(buffer, format="svg")
    plt.close(fig)
    markup = buffer.getvalue()
    # RDF metadata (creator, date) names external vocabularies; the report needs none of it.
    markup = re.sub(r"<metadata>.*?</metadata>", "", markup, flags=re.S)
    return markup[markup.index("<svg") :]


def _no_data(ax: Any, message: str) -> None:
    """Mark an empty plot so a reader sees why it is empty."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#777")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_score_distribution(daily: list[dict[str, Any]]) -> str:
    """Median score with its 10-90% band, per day."""
    fig, ax = _figure("Score distribution by day (p10-p90 band, median)")
    if daily:
        days = [r["day"] for r in daily]
        ax.fill_between(
            days, [r["score_p10"] for r in daily], [r["score_p90"] for r in daily], alpha=0.25
        )
        ax.plot(days, [r["score_p50"] for r in daily], marker="o", ms=3)
        ax.set_ylabel("probability of default")
        fig.autofmt_xdate()
    else:
        _no_data(ax, "no production scores yet")
    return _svg(fig, "plot-score-distribution")


def plot_approval_rate(daily: list[dict[str, Any]]) -> str:
    """Share of approved requests per day."""
    fig, ax = _figure("Approval rate by day")
    if daily:
        ax.plot(
            [r["day"] for r in daily], [float(r["approval_rate"]) for r in daily], marker="o", ms=3
        )
        ax.set_ylim(0, 1)
        fig.autofmt_xdate()
    else:
        _no_data(ax, "no production decisions yet")
    return _svg(fig, "plot-approval-rate")


def plot_psi(psi_rows: list[dict[str, Any]], warning: float, critical: float) -> str:
    """PSI per feature (and the score) of the newest drift run, with the alert levels."""
    title = "PSI per feature, latest scoring inputs vs training reference"
    if psi_rows:
        title += f" (as_of {psi_rows[0]['as_of']})"
    fig, ax = _figure(title)
    if psi_rows:
        names = [("score" if r["feature"] == "__score__" else r["feature"]) for r in psi_rows]
        values = [float(r["psi"]) for r in psi_rows]
        colors = [
            "#c0392b" if v >= critical else "#e67e22" if v >= warning else "#2e86c1" for v in values
        ]
        ax.barh(names[::-1], values[::-1], color=colors[::-1])
        ax.axvline(warning, color="#e67e22", ls="--", lw=1)
        ax.axvline(critical, color="#c0392b", ls="--", lw=1)
        ax.tick_params(axis="y", labelsize=7)
    else:
        _no_data(ax, "no drift run yet")
    return _svg(fig, "plot-psi")


def plot_queue_latency(daily: list[dict[str, Any]]) -> str:
    """Enqueue-to-result latency p50 and p99 per day."""
    fig, ax = _figure("Queue latency, enqueue to result (seconds)")
    if daily:
        days = [r["day"] for r in daily]
        ax.plot(days, [float(r["latency_p50_s"]) for r in daily], marker="o", ms=3, label="p50")
        ax.plot(days, [float(r["latency_p99_s"]) for r in daily], marker="o", ms=3, label="p99")
        ax.legend(fontsize=8)
        fig.autofmt_xdate()
    else:
        _no_data(ax, "no scored jobs yet")
    return _svg(fig, "plot-queue-latency")


def plot_vintage_auc(vintages: list[dict[str, Any]]) -> str:
    """AUC of the production model and default rate by request month (matured labels only)."""
    fig, ax = _figure("Vintage performance by request month (matured charges)")
    if vintages:
        months = [r["request_month"] for r in vintages]
        aucs = [r["auc"] if r["auc"] is not None else float("nan") for r in vintages]
        ax.plot(months, aucs, marker="o", ms=4, label="AUC")
        ax.plot(
            months,
            [float(r["default_rate"]) for r in vintages],
            marker="s",
            ms=3,
            label="default rate",
        )
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        fig.autofmt_xdate()
    else:
        _no_data(ax, "no matured vintages yet")
    return _svg(fig, "plot-vintage-auc")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """An escaped HTML table."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    """A table cell's text."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px} h2{font-size:15px;margin-top:28px}
figure{max-width:800px;margin:12px 0;border:1px solid #ddd;padding:6px;background:#fff}
figure svg{width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ccc;padding:3px 8px}
.muted{color:#777;font-size:12px}
"""


def render_dashboard(data: DashboardData) -> str:
    """The whole report as one self-contained HTML document."""
    plots = {
        "plot-score-distribution": plot_score_distribution(data.daily),
        "plot-approval-rate": plot_approval_rate(data.daily),
        "plot-psi": plot_psi(data.psi, data.psi_warning, data.psi_critical),
        "plot-queue-latency": plot_queue_latency(data.daily),
        "plot-vintage-auc": plot_vintage_auc(data.vintages),
    }
    figures = "\n".join(f'<figure id="{pid}">{svg}</figure>' for pid, svg in plots.items())
    incidents = (
        _table(data.incidents, ["check_name", "severity", "summary", "opened_at"])
        if data.incidents
        else "<p>None.</p>"
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data.notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>paylater-risk monitoring</title>
<style>{STYLE}</style></head><body>
<h1>paylater-risk monitoring</h1>
<p class="muted">Generated {data.generated_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC.</p>
<h2>Open incidents</h2>{incidents}
<h2>Plots</h2>
{figures}
<h2>Vintages</h2>{_table(data.vintages, ["request_month", "charges", "default_rate", "auc", "in_sample"])}
<ul class="muted">{notes}</ul>
</body></html>
"""


def write_dashboard(document: str, reports_dir: Path, as_of: date) -> Path:
    """Write the report as reports/monitoring-<as_of>.html and reports/monitoring-latest.html."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    path = reports_dir / f"monitoring-{as_of.isoformat()}.html"
    # LocalStorage writes each file through a scratch file of its own, renamed over the target:
    # readers never see a half-written report, and two reports written at once (a backfill's
    # days) never rename each other's.
    folder = LocalStorage(reports_dir.as_uri(), reports_dir)
    for target in (path, reports_dir / "monitoring-latest.html"):
        folder.write_bytes(target.name, document.encode("utf-8"))
    return path


def artifact_markdown(data: DashboardData, path: Path) -> str:
    """A short markdown summary for the Prefect artifact, pointing at the HTML file."""
    lines = ["# paylater-risk monitoring", "", f"Report: `{path}`", ""]
    if data.psi:
        lines += ["| feature | PSI |", "|---|---|"]
        lines += [f"| {r['feature']} | {float(r['psi']):.4f} |" for r in data.psi]
        lines.append("")
    if data.vintages:
        lines += ["| request month | charges | default rate | AUC |", "|---|---|---|---|"]
        lines += [
            f"| {r['request_month']} | {r['charges']} | {float(r['default_rate']):.3f} | "
            f"{_cell(r['auc'])} |"
            for r in data.vintages
        ]
        lines.append("")
    lines.append(f"Open incidents: {len(data.incidents)}")
    return "\n".join(lines)


# --- the daily run: drift, vintages, their storage and the report's data ----------------------


@dataclass
class DailyMonitoring:
    """What one daily monitoring run computed (None/empty where inputs are not there yet)."""

    as_of: date | None
    drift: DriftReport | None = None
    vintages: list[Vintage] = field(default_factory=list)
    model_version: str | None = None
    notes: list[str] = field(default_factory=list)
    score_rows: int = 0  # production scores behind the score PSI
    reference_day: date | None = None  # the scoring snapshot feature PSI compares with
    reference_score_rows: int = 0  # the model's scores of its training requests
    # Drift checks that could not be measured for a fault (an empty snapshot, a model that cannot
    # be loaded or scored): check -> why. Slack hears of it (flows/dashboard.py); a check with
    # nothing to judge yet (no earlier snapshot, no production model, no scores today) is not.
    unmeasured: dict[str, str] = field(default_factory=dict)


def recent_production_scores(engine: sa.Engine, since: datetime, version: str) -> list[float]:
    """Probabilities model `version` wrote since `since` ([] without a queue)."""
    if not sa.inspect(engine).has_table("scoring_results"):
        return []
    params = {"since": since, "version": version}
    with engine.connect() as conn:
        return [float(r[0]) for r in conn.execute(sa.text(load_sql("recent_scores")), params)]


def reference_day(available: list[date], trained: date, current: date) -> date | None:
    """The scoring snapshot feature drift is measured from: the newest at or before the day the
    model's training set was built, else the oldest after it; never the current one itself."""
    earlier = [d for d in available if d < current]
    at_or_before = [d for d in earlier if d <= trained]
    if at_or_before:
        return at_or_before[-1]
    return earlier[0] if earlier else None


def daily_monitoring(engine: sa.Engine, now: datetime) -> DailyMonitoring:
    """Feature PSI of the latest scoring inputs against the scoring inputs of the day the model
    was trained (the same population: every active user); score PSI of production scores against
    the model's scores of its training requests (both requests); vintage performance.

    The training rows are not the reference for features: they are requests (one per charge, at
    its request day), not active users. A user cannot ask for a charge while one is outstanding,
    so outstanding amounts are 0 in every training row and spread among users: their PSI is
    several units on the day a model is trained, without any drift.
    """
    from tasks.datasets import DatasetError, available_as_ofs, load_dataset
    from tasks.storage import open_storage

    storage = open_storage()
    snapshots = available_as_ofs(storage, "scoring")  # listed once: the latest and the reference
    try:
        scoring, scoring_manifest = load_dataset("scoring", max(snapshots, default=None), storage)
        training, training_manifest = load_dataset("training", None, storage)
    except DatasetError as exc:
        return DailyMonitoring(None, notes=[f"drift skipped: {exc}"])
    out = DailyMonitoring(scoring_manifest.as_of)
    try:
        model = production_model()
    except Exception as exc:  # a registry outage must not hide the feature drift
        model = None
        out.notes.append(f"production model not loadable: {exc}")
        out.unmeasured["score_psi"] = f"production model not loadable: {exc}"
    reference_scores = current_scores = None
    if model is None:
        out.notes.append("no production model: no score PSI or vintages")
    else:
        out.model_version = model.version
        try:
            reference_scores = model_scores(model, training)
            out.vintages = production_vintages(training, training_manifest.as_of, model)
        except ValueError as exc:  # e.g. a feature the model uses gone from the feature SQL
            reference_scores = None
            out.notes.append(
                f"production model version {model.version} not scored on the training set "
                f"as_of {training_manifest.as_of} ({exc}): no score PSI or vintages"
            )
            out.unmeasured["score_psi"] = out.notes[-1]
        if reference_scores is not None and len(reference_scores) == 0:
            out.unmeasured["score_psi"] = (
                f"the training set as_of {training_manifest.as_of} has no rows: no reference"
                f" scores for version {model.version}"
            )
        since = now - timedelta(days=1)
        current_scores = recent_production_scores(engine, since, model.version) or None
        out.score_rows = len(current_scores or [])
        if current_scores is None:
            out.notes.append(
                f"no production scores of version {model.version} in the last day: no score PSI"
            )
    trained = (model.trained_as_of if model else None) or training_manifest.as_of
    day = reference_day(snapshots, trained, scoring_manifest.as_of)
    if day is None:
        out.notes.append(
            f"no scoring snapshot before as_of {scoring_manifest.as_of} to measure feature drift from"
        )
        reference = scoring.slice(0, 0)
    else:
        reference, _ = load_dataset("scoring", day, storage)
        added = [c for c in numeric_features(scoring, scoring) if c not in reference.column_names]
        if added:
            out.notes.append(
                f"no feature drift for {', '.join(added)}: not in the reference snapshot ({day})"
            )
        out.notes.append(
            f"feature drift: scoring as_of {scoring_manifest.as_of} ({scoring.num_rows} users) vs "
            f"scoring as_of {day} ({reference.num_rows} users; the model's training set: as_of "
            f"{trained})"
        )
        for snapshot, table in (("the reference", reference), ("the latest", scoring)):
            if table.num_rows == 0:  # every feature's PSI needs values on both sides
                as_of = day if table is reference else scoring_manifest.as_of
                out.unmeasured["feature_psi_max"] = (
                    f"{snapshot} scoring snapshot as_of {as_of} has no rows: no feature drift"
                    " measured (rebuild it: prefect deployment run 'feature-build/feature-build'"
                    f" --param as_of={as_of})"
                )
    out.reference_day = day
    out.reference_score_rows = len(reference_scores) if reference_scores is not None else 0
    out.drift = drift_report(reference, scoring, None, reference_scores, current_scores)
    return out


def store_daily(warehouse: Any, daily: DailyMonitoring) -> None:
    """Write the day's PSI and vintages to monitoring_drift / monitoring_vintage (rerun-safe)."""
    if daily.as_of is None:
        return
    if daily.drift is not None:
        warehouse.replace_partition(
            "monitoring_drift", "as_of", daily.as_of, drift_rows(daily.drift, daily.as_of)
        )
    if daily.vintages and daily.model_version is not None:
        warehouse.replace_partition(
            "monitoring_vintage",
            "as_of",
            daily.as_of,
            vintage_rows(daily.vintages, daily.as_of, daily.model_version),
        )


def _judged(
    psi: float | None, rows: int, what: str, reference_rows: int, reference: str, detail: str
) -> tuple[float | None, str]:
    """`psi` and its detail, or None (not judged) when either side has too few rows."""
    if psi is None or min(rows, reference_rows) >= MIN_JUDGED_ROWS:
        return psi, detail
    return None, (
        f"{rows} {what} vs {reference_rows} {reference} (< {MIN_JUDGED_ROWS}): "
        f"too few to judge; {detail}"
    )


def drift_measurements(daily: DailyMonitoring, ignore: Collection[str] = ()) -> list[Measurement]:
    """The drift checks the incident machinery judges: the worst feature PSI (features in
    `ignore` left out) and the score PSI."""
    drift = daily.drift
    if drift is None:
        return []
    judged = {k: v for k, v in drift.feature_psi.items() if k not in ignore}
    worst = sorted(judged.items(), key=lambda kv: -kv[1])[:3]
    detail = "worst: " + ", ".join(f"{k}={v:.3f}" for k, v in worst)
    if ignore:
        detail += f"; not alerted on: {', '.join(sorted(ignore))}"
    if daily.reference_day is not None:
        detail += f" (scoring as_of {daily.as_of} vs {daily.reference_day})"
    feature_psi, detail = _judged(
        max(judged.values(), default=None),
        drift.current_rows,
        "scoring rows",
        drift.reference_rows,
        "reference scoring rows",
        detail,
    )
    score_psi, score_detail = _judged(
        drift.score_psi,
        daily.score_rows,
        "production scores in the last day",
        daily.reference_score_rows,
        "training rows",
        "production scores, last day, vs the model's scores of its training requests",
    )
    if feature_psi is None and not judged:
        detail = daily.unmeasured.get("feature_psi_max") or _no_feature_psi(daily, ignore)
    if drift.score_psi is None:
        score_detail = daily.unmeasured.get("score_psi") or _no_score_psi(daily)
    return [
        _not_judged_unless_faulty(daily, "feature_psi_max", feature_psi, detail),
        _not_judged_unless_faulty(daily, "score_psi", score_psi, score_detail),
    ]


def _not_judged_unless_faulty(
    daily: DailyMonitoring, check: str, value: float | None, detail: str
) -> Measurement:
    """A drift measurement; without a value, sparse (nothing to judge yet: not announced)
    unless a fault kept it from being measured (daily.unmeasured)."""
    sparse = value is None and check not in daily.unmeasured
    return Measurement(check, value, detail, sparse=sparse)


def _no_feature_psi(daily: DailyMonitoring, ignore: Collection[str]) -> str:
    """Why there is no feature PSI to judge, when no fault says so."""
    if daily.reference_day is None:
        return f"no scoring snapshot before as_of {daily.as_of} to measure feature drift from"
    skipped = daily.drift.skipped if daily.drift else {}
    if skipped:
        name, why = next(iter(skipped.items()))
        return f"no feature PSI: {name}: {why}"
    left_out = f" (not alerted on: {', '.join(sorted(ignore))})" if ignore else ""
    return f"no numeric feature shared by both snapshots to judge{left_out}"


def _no_score_psi(daily: DailyMonitoring) -> str:
    """Why there is no score PSI to judge, when no fault says so."""
    if daily.model_version is None:
        return "no production model: no score PSI"
    if daily.score_rows == 0:
        return f"no production scores of version {daily.model_version} in the last day"
    skipped = daily.drift.skipped.get("score") if daily.drift else None
    return f"no score PSI: {skipped or 'not computed'}"


DRIFT_RESOLVE_SETTING = "PAYLATER_MONITOR_DRIFT_RESOLVE_AFTER_REPORTS"


def drift_resolve_after_reports(settings: Settings) -> int:
    """How many reports in a row below a drift incident's level step it down (hysteresis);
    ValueError naming the setting when it cannot work (below 1: nothing would ever resolve)."""
    reports = settings.monitor_drift_resolve_after_reports
    if reports < 1:
        raise ValueError(
            f"monitoring thresholds: {DRIFT_RESOLVE_SETTING} must be 1 or more (is {reports}):"
            " the monitoring reports in a row below its level after which a drift incident"
            " resolves (1: at once)"
        )
    return int(reports)


def not_yet_counted(
    results: Iterable[CheckResult],
    incidents: Iterable[dict[str, Any]],
    now: datetime,
    data_day: date | None = None,
) -> list[CheckResult]:
    """`results`, less those that would count twice: this report (`now`) already recorded them
    (a retry of its alerting step), or the incident already counted a later data day
    (`data_day`, the snapshot's as_of: a backfill of an older day says nothing of today), or this
    very day (a manual rerun on the same snapshot). A rerun's result at or above its incident's
    level still goes through: it never steps down, and corrected data that is worse must
    escalate at once."""
    rank = {level: i for i, level in enumerate(LEVELS)}
    skipped: set[str] = set()
    same_day: dict[str, int] = {}  # check -> its incident's level, where this day was counted
    for incident in incidents:
        check, seen = incident["check_name"], incident["last_seen_at"]
        day = _day(incident["counted_day"]) if incident["counted_day"] is not None else None
        retried = seen is not None and as_utc(seen) == now
        if retried or (data_day is not None and day is not None and day > data_day):
            skipped.add(check)
        elif data_day is not None and day == data_day:
            same_day[check] = rank.get(incident["severity"], len(LEVELS))
    return [
        r
        for r in results
        if r.check not in skipped and rank.get(r.level, -1) >= same_day.get(r.check, -1)
    ]


def _day(value: date | str) -> date:
    """A counted_day as read back (a date; ISO text from SQLite)."""
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def gather_dashboard(
    engine: sa.Engine, warehouse: Any, settings: Settings, now: datetime, notes: list[str]
) -> DashboardData:
    """Read everything the report plots."""
    return DashboardData(
        generated_at=now,
        daily=daily_scoring(engine, settings.monitor_report_days, settings.timezone, now),
        psi=warehouse_rows(warehouse, "monitoring_drift", "drift_latest"),
        vintages=warehouse_rows(warehouse, "monitoring_vintage", "vintage_latest"),
        incidents=open_incidents(engine)
        if sa.inspect(engine).has_table("monitor_incidents")
        else [],
        psi_warning=settings.monitor_psi_warning,
        psi_critical=settings.monitor_psi_critical,
        notes=notes,
    )
