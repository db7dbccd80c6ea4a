"""End to end: the daily monitoring report on real datasets, a registered production model and a
real queue: PSI and vintages stored, a drift alert delivered, the HTML report and the artifact."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from paylater.testing import JsonReceiver

WORKER_DDL = Path(__file__).resolve().parents[2] / "worker" / "schema.sql"
FIRST_MONTH = date(2026, 1, 1)


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict]]]:
    """A webhook on a free loopback port keeping every JSON body; (url, payloads)."""
    with JsonReceiver() as webhook:
        yield webhook.url, webhook.bodies


def register_production_model(training: pa.Table, features: list[str], trained_as_of: date) -> str:
    """Train a small booster on the first months and register it as production (contract tags)."""
    import lightgbm as lgb
    import mlflow

    from registry.store import MODEL_NAME, client, configure_mlflow
    from tasks.training import feature_matrix, labels

    configure_mlflow()
    early = training.filter(pc.less(training["request_date"], pa.scalar(date(2026, 5, 1))))
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "num_threads": 1, "num_leaves": 7, "seed": 1},
        lgb.Dataset(feature_matrix(early, features), labels(early), feature_name=features),
        num_boost_round=40,
    )
    experiment = mlflow.create_experiment("t", artifact_location=(Path.cwd() / "art").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.lightgbm.log_model(
            booster, name="model", registered_model_name=MODEL_NAME, pip_requirements=["lightgbm"]
        )
    version = str(info.registered_model_version)
    c = client()
    c.set_model_version_tag(MODEL_NAME, version, "feature_names", json.dumps(features))
    c.set_model_version_tag(
        MODEL_NAME,
        version,
        "dataset_uri",
        f"file:///x/training/as_of={trained_as_of}/part-0.parquet",
    )
    c.set_registered_model_alias(MODEL_NAME, "production", version)
    return version


def test_monitoring_report_end_to_end(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: tuple[str, list[dict]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.dashboard import monitoring_report
    from registry.testing import (
        USER_FEATURES,
        as_of_after,
        empty_mlflow_db,
        synthetic_training_table,
    )
    from registry.testing import write_dataset as write_training
    from tasks.warehouse import open_warehouse

    url, payloads = receiver
    monkeypatch.chdir(paylater_home)
    monkeypatch.setenv("PAYLATER_SOURCE_URL", pg_url)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_mlflow_db(paylater_home / "mlflow.db"))
    for var in (
        "PAYLATER_WORKER_DATABASE_URL",
        "PAYLATER_ALERT_SLACK_BLOCK",
        "PAYLATER_ALERT_PAGERDUTY_BLOCK",
    ):
        monkeypatch.delenv(var, raising=False)

    # six request months, all matured; the model saw the first four
    training, _ = synthetic_training_table(3000, FIRST_MONTH, 6, seed=3)
    as_of = as_of_after(FIRST_MONTH, 6)
    write_training(training, as_of)
    features = ["request_amount_jpy", "request_fee_jpy", *USER_FEATURES]
    version = register_production_model(training, features, as_of_after(FIRST_MONTH, 4))
    # Feature drift compares active users with active users: the scoring snapshot of the day the
    # model's training set was built, and the latest one, where users transact much more (drift
    # on one feature). The training rows (requests, 3000) are not that population.
    trained_day = as_of_after(FIRST_MONTH, 4)
    users = training.select(["user_id", *USER_FEATURES]).slice(0, 800)
    shifted = users.set_column(1, "txn_count_30d", pc.add(users["txn_count_30d"], 25))
    # a feature added since the model was trained: no reference for it, and the report says so
    shifted = shifted.append_column("new_feature_30d", pc.multiply(users["txn_count_30d"], 2))
    for day, table in ((trained_day, users), (as_of, shifted)):
        write_scoring(day, table, list(USER_FEATURES))
    # production scores of the last hours in the queue
    rng = np.random.default_rng(5)
    now = datetime.now(UTC)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(WORKER_DDL.read_text())
        for i in range(60):
            created = now - timedelta(minutes=i)
            job = conn.execute(
                "INSERT INTO scoring_jobs (user_id, payload, status, created_at) VALUES (%s, '{}', 'done', %s) RETURNING id",
                [i, created],
            ).fetchone()
            assert job is not None  # RETURNING yields the inserted row
            p = float(rng.uniform(0.0, 0.6))
            conn.execute(
                "INSERT INTO scoring_results (job_id, probability, decision, model_version, reason_codes, scored_at)"
                " VALUES (%s, %s, %s, %s, '[]', %s)",
                [
                    job[0],
                    p,
                    "approve" if p < 0.2 else "decline",
                    version,
                    created + timedelta(milliseconds=30),
                ],
            )

    path = monitoring_report()

    document = path.read_text()
    for plot_id in (
        "plot-score-distribution",
        "plot-approval-rate",
        "plot-psi",
        "plot-queue-latency",
        "plot-vintage-auc",
    ):
        assert f'<figure id="{plot_id}"><svg' in document
    assert "no production scores yet" not in document and "no matured vintages yet" not in document
    assert "no feature drift for new_feature_30d: not in the reference snapshot" in document
    assert (paylater_home / "reports" / "monitoring-latest.html").exists()

    warehouse = open_warehouse(f"duckdb:///{paylater_home / 'warehouse.duckdb'}")
    drift = {
        r["feature"]: r["psi"]
        for r in warehouse.query_arrow("SELECT feature, psi FROM monitoring_drift").to_pylist()
    }
    vintages = warehouse.query_arrow(
        "SELECT * FROM monitoring_vintage ORDER BY request_month"
    ).to_pylist()
    warehouse.close()
    assert set(drift) == {*USER_FEATURES, "__score__"}
    assert drift["txn_count_30d"] > 0.25
    assert {drift[f] for f in USER_FEATURES if f != "txn_count_30d"} == {0.0}  # the same users
    assert [v["in_sample"] for v in vintages] == [True] * 4 + [False] * 2
    assert all(v["model_version"] == version and v["auc"] > 0.6 for v in vintages)
    assert sum(v["charges"] for v in vintages) == 3000

    subjects = [p["subject"] for p in payloads]
    assert "[FIRING] paylater critical: feature_psi_max" in subjects
    body = next(p["body"] for p in payloads if "feature_psi_max" in p["subject"])
    assert "txn_count_30d" in body and f"vs {as_of_after(FIRST_MONTH, 4)}" in body

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["monitoring-dashboard"]))
        )
    assert artifacts and str(path) in str(artifacts[-1].data)


def test_a_drift_alert_the_webhook_refused_fails_the_task_and_is_resent(
    pg_url: str, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drift checks run once a day: a drift alert Slack refused (429, 5xx) rolls its incident
    back for a resend, and without one the next chance is tomorrow's run, with nothing said. The
    task fails (Prefect retries it; once retries run out the flow fails, and the monitor's
    failed_flows check pages) and a resend delivers it, once."""
    from flows.dashboard import drift_incidents
    from paylater.settings import get_settings
    from tasks.dashboard import DailyMonitoring
    from tasks.drift import DriftReport
    from tasks.monitoring import open_incidents, open_queue_db

    webhook = JsonReceiver(status=503)
    payloads = webhook.bodies
    monkeypatch.setenv("PAYLATER_SOURCE_URL", pg_url)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", webhook.url)
    for var in (
        "PAYLATER_WORKER_DATABASE_URL",
        "PAYLATER_ALERT_SLACK_BLOCK",
        "PAYLATER_ALERT_PAGERDUTY_BLOCK",
        "PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY",
        "PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY_BLOCK",
    ):
        monkeypatch.delenv(var, raising=False)
    drift = DriftReport({"txn_count_30d": 1.5}, None, reference_rows=800, current_rows=800)
    daily = DailyMonitoring(date(2026, 7, 1), drift=drift, reference_day=date(2026, 5, 1))
    now = datetime.now(UTC)
    try:
        with pytest.raises(RuntimeError, match="feature_psi_max"):
            drift_incidents.fn(daily, now)
        engine = open_queue_db(get_settings())
        assert open_incidents(engine) == []  # rolled back: the resend opens it
        webhook.status = 200
        (sent,) = drift_incidents.fn(daily, now)
        assert sent.subject == "[FIRING] paylater critical: feature_psi_max"
        assert drift_incidents.fn(daily, now) == []  # delivered once, not again
        assert [i["check_name"] for i in open_incidents(engine)] == ["feature_psi_max"]
        engine.dispose()
        assert len(payloads) == 2
    finally:
        webhook.close()


def test_a_production_model_the_training_set_cannot_score_does_not_hide_feature_drift(
    pg_url: str, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feature SQL dropped a column the production model uses: its scores and vintages cannot
    be computed on the new training set, but the daily run raised, so the feature drift (which
    is what shows such a change) was never computed, stored or alerted on either."""
    import sqlalchemy as sa

    from registry.testing import (
        USER_FEATURES,
        as_of_after,
        empty_mlflow_db,
        synthetic_training_table,
    )
    from registry.testing import write_dataset as write_training
    from tasks.dashboard import daily_monitoring

    monkeypatch.chdir(paylater_home)
    monkeypatch.setenv("PAYLATER_SOURCE_URL", pg_url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_mlflow_db(paylater_home / "mlflow.db"))
    monkeypatch.delenv("PAYLATER_WORKER_DATABASE_URL", raising=False)
    training, _ = synthetic_training_table(1200, FIRST_MONTH, 6, seed=4)
    training = training.append_column("gone_30d", training["txn_count_30d"])
    features = ["request_amount_jpy", *USER_FEATURES, "gone_30d"]
    register_production_model(training, features, as_of_after(FIRST_MONTH, 4))
    as_of = as_of_after(FIRST_MONTH, 6)
    write_training(training.drop_columns(["gone_30d"]), as_of)  # the feature SQL dropped it
    users = training.select(["user_id", *USER_FEATURES]).slice(0, 400)
    shifted = users.set_column(1, "txn_count_30d", pc.add(users["txn_count_30d"], 25))
    for day, table in ((as_of_after(FIRST_MONTH, 4), users), (as_of, shifted)):
        write_scoring(day, table, list(USER_FEATURES))
    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        daily = daily_monitoring(engine, datetime.now(UTC))
    finally:
        engine.dispose()
    assert daily.drift is not None and daily.drift.feature_psi["txn_count_30d"] > 0.25
    assert daily.drift.score_psi is None and daily.vintages == []
    assert any("lacks model features: gone_30d" in note for note in daily.notes)


def write_scoring(day: date, users: pa.Table, users_features: list[str]) -> None:
    """Store `users` as the scoring snapshot of `day`."""
    from tasks.datasets import write_dataset
    from tasks.storage import open_storage

    write_dataset(
        open_storage(),
        "scoring",
        day,
        users.append_column("as_of", pa.array([day] * users.num_rows, pa.date32())),
        features=users_features,
        sql_hash="x",
        source_watermark=None,
    )


@pytest.fixture
def drift_alerting(
    pg_url: str, receiver: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch
) -> list[dict]:
    """Drift incidents kept in the test PostgreSQL, their notices posted to the receiver (whose
    payloads this returns), at the default hysteresis; no other alert channel."""
    url, payloads = receiver
    monkeypatch.setenv("PAYLATER_SOURCE_URL", pg_url)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", url)
    for var in (
        "PAYLATER_WORKER_DATABASE_URL",
        "PAYLATER_ALERT_SLACK_BLOCK",
        "PAYLATER_ALERT_PAGERDUTY_BLOCK",
        "PAYLATER_MONITOR_DRIFT_RESOLVE_AFTER_REPORTS",
    ):
        monkeypatch.delenv(var, raising=False)
    return payloads


@dataclass
class DriftWorld:
    """A trained model's day with a reference scoring snapshot 30 days before it (no production
    model: feature drift is measured against that snapshot), and two populations to report on."""

    payloads: list[dict]
    trained: date
    users: pa.Table
    shifted: pa.Table  # txn_count_30d moved by 25: a critical feature_psi_max
    last: list[dict] = field(default_factory=list)  # the last report's notices, whole

    def report(self, day: date | None = None, table: pa.Table | None = None) -> list[str]:
        """Write `table` as the scoring snapshot of `day` (None: a rerun on the newest snapshot
        already written), run the monitoring report; the feature_psi_max notices it sent."""
        from flows.dashboard import monitoring_report
        from registry.testing import USER_FEATURES

        if day is not None and table is not None:
            write_scoring(day, table, list(USER_FEATURES))
        monitoring_report()
        self.last = list(self.payloads)
        sent = [p["subject"] for p in self.payloads if "feature_psi_max" in p["subject"]]
        self.payloads.clear()
        return sent

    def incident(self) -> dict | None:
        """The open feature_psi_max incident, if any."""
        from paylater.settings import get_settings
        from tasks.monitoring import open_incidents, open_queue_db

        engine = open_queue_db(get_settings())
        try:
            found = [i for i in open_incidents(engine) if i["check_name"] == "feature_psi_max"]
        finally:
            engine.dispose()
        return found[0] if found else None


@pytest.fixture
def drift_world(
    prefect_harness: None,
    drift_alerting: list[dict],
    paylater_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> DriftWorld:
    """Drift reports with the default hysteresis, alerts to the receiver."""
    from registry.testing import (
        USER_FEATURES,
        as_of_after,
        empty_mlflow_db,
        synthetic_training_table,
    )
    from registry.testing import write_dataset as write_training

    monkeypatch.chdir(paylater_home)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_mlflow_db(paylater_home / "mlflow.db"))
    training, _ = synthetic_training_table(1200, FIRST_MONTH, 6, seed=6)
    trained = as_of_after(FIRST_MONTH, 6)
    write_training(training, trained)
    users = training.select(["user_id", *USER_FEATURES]).slice(0, 600)
    shifted = users.set_column(1, "txn_count_30d", pc.add(users["txn_count_30d"], 25))
    write_scoring(trained - timedelta(days=30), users, list(USER_FEATURES))  # the reference
    return DriftWorld(drift_alerting, trained, users, shifted)


def test_a_drift_incident_resolves_only_after_enough_clean_reports_in_a_row(
    drift_world: DriftWorld,
) -> None:
    """Drift alerts share the monitor's hysteresis, counted in reports: a PSI back under its
    level for one day (a weekday's population, a value hovering at 0.25) no longer resolves the
    page only for the next report to fire it again. With the default of 2, the first clean report
    keeps the incident open, the second resolves it (and its page), once."""
    w = drift_world
    assert w.report(w.trained + timedelta(days=1), w.shifted) == [
        "[FIRING] paylater critical: feature_psi_max"
    ]
    assert w.report(w.trained + timedelta(days=2), w.users) == []  # one clean report: still open
    incident = w.incident()
    assert incident is not None
    assert incident["severity"] == "critical" and incident["runs_ok"] == 1
    assert w.report(w.trained + timedelta(days=3), w.users) == [
        "[RESOLVED] paylater: feature_psi_max"
    ]
    assert w.incident() is None


def test_a_retried_alerting_step_counts_its_report_once(
    paylater_home: Path, drift_alerting: list[dict]
) -> None:
    """drift_incidents is retried by Prefect when an alert is not delivered; each attempt judged
    the same report again, so with hysteresis a retry counted as one more clean report and
    resolved the other drift incident a day early. An attempt now leaves out the incidents an
    earlier attempt of the same report already recorded; a later report counts."""
    from flows.dashboard import drift_incidents
    from paylater.settings import get_settings
    from tasks.dashboard import DailyMonitoring
    from tasks.drift import DriftReport
    from tasks.monitoring import open_incidents, open_queue_db

    payloads = drift_alerting

    def daily(psi: float, day: int) -> DailyMonitoring:
        drift = DriftReport({"txn_count_30d": psi}, None, reference_rows=800, current_rows=800)
        return DailyMonitoring(date(2026, 7, day), drift=drift, reference_day=date(2026, 5, 1))

    first = datetime(2026, 7, 1, 20, 0, tzinfo=UTC)
    (fired,) = drift_incidents.fn(daily(1.5, 1), first)
    assert fired.subject == "[FIRING] paylater critical: feature_psi_max"
    clean = first + timedelta(days=1)
    assert drift_incidents.fn(daily(0.01, 2), clean) == []
    assert drift_incidents.fn(daily(0.01, 2), clean) == []  # its retry: not a second report
    engine = open_queue_db(get_settings())
    try:
        (incident,) = open_incidents(engine)
        assert incident["runs_ok"] == 1
        (resolved,) = drift_incidents.fn(daily(0.01, 3), clean + timedelta(days=1))
        assert resolved.subject == "[RESOLVED] paylater: feature_psi_max"
        assert open_incidents(engine) == []
    finally:
        engine.dispose()
    assert [p["subject"] for p in payloads] == [fired.subject, resolved.subject]


def test_two_reports_of_one_day_overlapping_count_it_once(
    paylater_home: Path,
    drift_alerting: list[dict],
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A manual rerun of the monitoring report beside the triggered one, on the same day's
    snapshot: each read the incident before either counted the day, so both counted it, and two
    reports of one clean day resolved a critical drift incident (and its page) a day early. The
    two overlapping now leave it as one after the other do: the day counted once, still open."""
    from flows.dashboard import drift_incidents
    from paylater.settings import get_settings
    from tasks import monitoring
    from tasks.dashboard import DailyMonitoring
    from tasks.drift import DriftReport
    from tasks.monitoring import Notification, open_incidents, open_queue_db
    from tests.tasks.test_monitoring import Overlap

    def daily(psi: float, day: int) -> DailyMonitoring:
        drift = DriftReport({"txn_count_30d": psi}, None, reference_rows=800, current_rows=800)
        return DailyMonitoring(date(2026, 7, day), drift=drift, reference_day=date(2026, 5, 1))

    first = datetime(2026, 7, 1, 20, 0, tzinfo=UTC)
    (fired,) = drift_incidents.fn(daily(1.5, 1), first)
    overlap = Overlap(pg_url, "feature_psi_max")
    monkeypatch.setattr(monitoring, "_incident_change", overlap.wrap(monitoring._incident_change))
    sent: list[Notification] = []

    def report(now: datetime) -> Callable[[], None]:
        return overlap.run(lambda: sent.extend(drift_incidents.fn(daily(0.01, 2), now)))

    clean = first + timedelta(days=1)
    reports = [clean, clean + timedelta(minutes=7)]  # the triggered one, the manual rerun
    threads = [threading.Thread(target=report(at)) for at in reports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap.met  # (a later evaluation passes the gate: the two finished)
    assert sent == []
    engine = open_queue_db(get_settings())
    try:
        (incident,) = open_incidents(engine)
        assert (incident["severity"], incident["runs_ok"]) == ("critical", 1)
    finally:
        engine.dispose()
    (resolved,) = drift_incidents.fn(daily(0.01, 3), clean + timedelta(days=1))
    assert resolved.subject == "[RESOLVED] paylater: feature_psi_max"
    assert [p["subject"] for p in drift_alerting] == [fired.subject, resolved.subject]


def test_a_backfilled_older_day_is_not_counted_and_a_worse_rerun_escalates(
    paylater_home: Path, drift_alerting: list[dict]
) -> None:
    """Reports count per data day: a report of an older day (a backfill) neither counts toward
    resolving nor escalates on data the newer day superseded; a rerun of the day already counted
    whose corrected data is worse escalates at once."""
    from flows.dashboard import drift_incidents
    from paylater.settings import get_settings
    from tasks.dashboard import DailyMonitoring
    from tasks.drift import DriftReport
    from tasks.monitoring import open_incidents, open_queue_db

    def report(psi: float, day: int, hour: int) -> list[str]:
        drift = DriftReport({"txn_count_30d": psi}, None, reference_rows=800, current_rows=800)
        daily = DailyMonitoring(date(2026, 7, day), drift=drift, reference_day=date(2026, 5, 1))
        now = datetime(2026, 7, 10, hour, 0, tzinfo=UTC)
        return [n.subject for n in drift_incidents.fn(daily, now)]

    assert report(0.15, 2, 1) == ["[FIRING] paylater warning: feature_psi_max"]
    assert report(0.01, 3, 2) == []  # one clean day
    assert report(0.01, 1, 3) == []  # a backfill of an older clean day: not a second one
    assert report(0.50, 1, 4) == []  # nor does an older day's worse PSI escalate
    engine = open_queue_db(get_settings())
    try:
        (incident,) = open_incidents(engine)
        assert (incident["severity"], incident["runs_ok"]) == ("warning", 1)
        assert incident["counted_day"] == date(2026, 7, 3)
    finally:
        engine.dispose()
    assert report(0.50, 3, 5) == ["[ESCALATED] paylater critical: feature_psi_max"]


def test_a_backfilled_older_day_opens_no_incident_on_data_a_later_day_superseded(
    paylater_home: Path, drift_alerting: list[dict]
) -> None:
    """An older day's report (a backfill) was kept from counting only when an incident was open:
    with none, an old day's critical PSI opened one and paged on data a later day had judged
    clean. A check already judged on a later day is now left as it is."""
    from flows.dashboard import drift_incidents
    from tasks.dashboard import DailyMonitoring
    from tasks.drift import DriftReport

    def report(psi: float, day: int, hour: int) -> list[str]:
        drift = DriftReport({"txn_count_30d": psi}, None, reference_rows=800, current_rows=800)
        daily = DailyMonitoring(date(2026, 7, day), drift=drift, reference_day=date(2026, 5, 1))
        now = datetime(2026, 7, 10, hour, 0, tzinfo=UTC)
        return [n.subject for n in drift_incidents.fn(daily, now)]

    assert report(0.01, 3, 1) == []
    assert report(1.50, 1, 2) == []  # a backfill: day 3 was judged clean already
    assert report(1.50, 4, 3) == ["[FIRING] paylater critical: feature_psi_max"]
    assert [p["subject"] for p in drift_alerting] == ["[FIRING] paylater critical: feature_psi_max"]


def test_a_backfilled_older_day_neither_opens_nor_resolves_the_current_unmeasured_notice(
    paylater_home: Path, drift_alerting: list[dict]
) -> None:
    """monitor_unmeasured kept no data day: a report of an older day (a backfill) was taken for
    the present, so an old day that could not be measured told Slack [UNMEASURED] while today's
    was measured, and an old day measured fine RESOLVED today's unmeasured notice while today's
    still could not be. A report of a day older than the newest judged now leaves both as they
    are; the same day rerun, and a later day, still count."""
    from flows.dashboard import drift_incidents
    from tasks.dashboard import DailyMonitoring
    from tasks.drift import DriftReport

    def report(day: int, hour: int, measured: bool) -> list[str]:
        psi = {"txn_count_30d": 0.01} if measured else {}
        drift = DriftReport(psi, None, reference_rows=800, current_rows=800 if measured else 0)
        fault = (
            {} if measured else {"feature_psi_max": f"the scoring snapshot of day {day} is empty"}
        )
        daily = DailyMonitoring(
            date(2026, 7, day), drift=drift, reference_day=date(2026, 5, 1), unmeasured=fault
        )
        now = datetime(2026, 7, 10, hour, 0, tzinfo=UTC)
        return [n.subject for n in drift_incidents.fn(daily, now)]

    unmeasured = "[UNMEASURED] paylater warning: feature_psi_max"
    again = "[RESOLVED] paylater: feature_psi_max measured again"
    assert report(3, 1, measured=True) == []
    assert report(1, 2, measured=False) == []  # a backfill of an unmeasurable old day: silent
    assert report(4, 3, measured=False) == [unmeasured]  # today's data cannot be measured
    assert report(2, 4, measured=True) == []  # an old day measured says nothing of today's
    assert report(4, 5, measured=False) == []  # the same day again: told once
    assert report(5, 6, measured=True) == [again]
    assert [p["subject"] for p in drift_alerting] == [unmeasured, again]


def test_a_drift_resolve_count_below_1_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from paylater.settings import Settings
    from tasks.dashboard import drift_resolve_after_reports

    monkeypatch.delenv("PAYLATER_MONITOR_DRIFT_RESOLVE_AFTER_REPORTS", raising=False)
    assert drift_resolve_after_reports(Settings()) == 2
    monkeypatch.setenv("PAYLATER_MONITOR_DRIFT_RESOLVE_AFTER_REPORTS", "0")
    with pytest.raises(ValueError, match="PAYLATER_MONITOR_DRIFT_RESOLVE_AFTER_REPORTS must be 1"):
        drift_resolve_after_reports(Settings())


def test_a_rerun_report_of_a_day_already_counted_does_not_count_again(
    drift_world: DriftWorld,
) -> None:
    """A manual rerun of the report on the same scoring snapshot counted as one more clean report:
    two runs on one day's data resolved a critical drift incident (and its page) without a second
    day confirming it. A report now counts once per data day (its snapshot's as_of)."""
    w = drift_world
    assert w.report(w.trained + timedelta(days=1), w.shifted) == [
        "[FIRING] paylater critical: feature_psi_max"
    ]
    assert w.report(w.trained + timedelta(days=2), w.users) == []  # one clean day: still open
    assert w.report() == []  # rerun on the same day's data: not a second clean report
    incident = w.incident()
    assert incident is not None and incident["runs_ok"] == 1
    assert w.report(w.trained + timedelta(days=3), w.users) == [
        "[RESOLVED] paylater: feature_psi_max"
    ]


def test_an_incident_table_made_before_counted_days_gets_the_column(pg_url: str) -> None:
    """A monitor_incidents table from before drift incidents counted data days keeps its open
    incidents and gains the column, empty (their next report counts)."""
    import sqlalchemy as sa

    from tasks.monitoring import ensure_incident_table, open_incidents, sqlalchemy_url

    engine = sa.create_engine(sqlalchemy_url(pg_url), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS monitor_incidents"))
            conn.execute(
                sa.text(
                    "CREATE TABLE monitor_incidents (check_name text PRIMARY KEY, severity text"
                    " NOT NULL, peak_severity text NOT NULL, value double precision, summary text"
                    " NOT NULL, opened_at timestamptz NOT NULL, last_seen_at timestamptz NOT NULL)"
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO monitor_incidents VALUES ('score_psi', 'warning', 'warning',"
                    " 0.2, 'score_psi = 0.200', now(), now())"
                )
            )
        ensure_incident_table(engine)
        (incident,) = open_incidents(engine)
        assert incident["counted_day"] is None and incident["runs_ok"] == 0
    finally:
        engine.dispose()


def test_an_empty_reference_snapshot_warns_slack_naming_it_and_resolves_once_fixed(
    drift_world: DriftWorld, paylater_home: Path
) -> None:
    """The scoring snapshot feature drift is measured from was written empty (a build on a day
    the source returned no users): every feature's PSI raised "needs values on both sides", the
    check was unknown with the detail "worst: " and nothing told anybody, day after day, while
    drift went unwatched. Now Slack hears one warning naming the empty snapshot (never a page),
    the report is still written, and a RESOLVED once a report measures it again. No production
    model is no fault: its score PSI stays quiet."""
    from registry.testing import USER_FEATURES

    w = drift_world
    reference = w.trained - timedelta(days=30)
    write_scoring(reference, w.users.slice(0, 0), list(USER_FEATURES))  # rewritten empty
    w.report(w.trained + timedelta(days=1), w.users)
    (warned,) = w.last
    assert warned["subject"] == "[UNMEASURED] paylater warning: feature_psi_max"
    assert warned["severity"] == "warning"
    assert f"the reference scoring snapshot as_of {reference} has no rows" in warned["body"]
    assert (paylater_home / "reports" / "monitoring-latest.html").exists()
    w.report(w.trained + timedelta(days=2), w.users)
    assert w.last == []  # told once

    write_scoring(reference, w.users, list(USER_FEATURES))  # rebuilt
    w.report(w.trained + timedelta(days=3), w.users)
    assert [p["subject"] for p in w.last] == ["[RESOLVED] paylater: feature_psi_max measured again"]


def test_a_warehouse_that_cannot_keep_the_days_numbers_still_lets_drift_alert(
    drift_world: DriftWorld, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warehouse keeps the day's drift and vintage numbers and feeds the dashboard; held by
    another process (a long sync, a notebook), those steps fail. The drift checks need neither:
    a critical drift still alerts that day, and the run fails after it, naming the warehouse,
    instead of failing first and leaving the drift unsaid until the warehouse is free again."""
    import flows.dashboard
    from flows.dashboard import monitoring_report
    from paylater.testing import duckdb_held_elsewhere
    from registry.testing import USER_FEATURES

    w = drift_world
    # The task's own retries (30 s apart) only lengthen the test: the warehouse stays held.
    monkeypatch.setattr(flows.dashboard, "store", flows.dashboard.store.with_options(retries=0))
    write_scoring(w.trained + timedelta(days=1), w.shifted, list(USER_FEATURES))
    with (
        duckdb_held_elsewhere(paylater_home / "warehouse.duckdb"),
        pytest.raises(Exception, match="lock"),
    ):
        monitoring_report()
    subjects = [p["subject"] for p in w.payloads]
    assert "[FIRING] paylater critical: feature_psi_max" in subjects, subjects
    assert w.incident() is not None


def test_a_report_without_data_is_named_for_the_last_ended_business_day(
    prefect_harness: None,
    paylater_home: Path,
    receiver: tuple[str, list[dict]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before any scoring snapshot, the report was named by the UTC date of the run: at 10:00 UTC
    that is a Tokyo day not yet ended, one day ahead of every report with data (named by its data
    day), so the list of reports skipped a day and showed one from the future."""
    import flows.dashboard
    from flows.dashboard import monitoring_report
    from registry.testing import empty_mlflow_db

    url, _ = receiver
    monkeypatch.chdir(paylater_home)
    monkeypatch.setenv("PAYLATER_SOURCE_URL", f"sqlite:///{paylater_home / 'source.db'}")
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_mlflow_db(paylater_home / "mlflow.db"))
    monkeypatch.setattr(flows.dashboard, "utc_now", lambda: datetime(2026, 11, 29, 10, tzinfo=UTC))
    path = monitoring_report()
    assert path.name == "monitoring-2026-11-28.html"
