"""End to end: monitor() alerts real HTTP receivers (a Slack-compatible webhook, a stand-in for
PagerDuty's Events API v2) once per incident, then once when it clears."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prefect.logging.configuration import ensure_logging_setup

# Prefect configures logging when its flow API is first imported, and that first time it
# replaces the root logger's handlers: inside a test (flows.monitor imported there), it removed
# caplog's handler, and a test run alone captured no log. Configured here, at collection, any
# later set-up is incremental and leaves the handlers alone.
ensure_logging_setup()

QUICK_SHUTDOWN = {"poll_interval": 0.05}
"""serve_forever's default 0.5 s poll made every server's shutdown() wait up to 0.5 s."""

WORKER_DDL = Path(__file__).resolve().parents[2] / "worker" / "schema.sql"
UNSET = (
    "PAYLATER_WORKER_DATABASE_URL",
    "PAYLATER_ALERT_SLACK_BLOCK",
    "PAYLATER_ALERT_PAGERDUTY_BLOCK",
    "PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY",
    "PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY_BLOCK",
)
FAKE_KEY = "fake-routing-key-for-tests-0000"


class Receiver:
    """A Slack-compatible webhook on a free loopback port that keeps every JSON body it gets."""

    def __init__(self, status: int = 200) -> None:
        self.payloads: list[dict] = []
        self.gets: list[str] = []  # paths requested with GET (a heartbeat check)
        self.status = status  # what the webhook answers (500: Slack is down)
        received = self.payloads
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(owner.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def do_GET(self) -> None:
                owner.gets.append(self.path)
                self.send_response(owner.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs=QUICK_SHUTDOWN, daemon=True
        )
        self.thread.start()

    def take(self) -> list[dict]:
        """The payloads received since the last take."""
        got = list(self.payloads)
        self.payloads.clear()
        return got

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A running receiver, stopped after the test."""
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def pagerduty() -> Iterator[Receiver]:
    """A stand-in for PagerDuty's Events API v2: answers 202 Accepted."""
    r = Receiver(status=202)
    try:
        yield r
    finally:
        r.close()


def point_monitor_at(
    monkeypatch: pytest.MonkeyPatch,
    pg_url: str,
    home: Path,
    webhook: str | None = None,
    pagerduty: str | None = None,
) -> str:
    """The monitor's databases (queue in `pg_url`, a DuckDB warehouse in `home`), its Slack
    webhook and its PagerDuty Events API URL (with FAKE_KEY); no other alert channel. Returns the
    warehouse URL."""
    warehouse_url = f"duckdb:///{home / 'warehouse.duckdb'}"
    monkeypatch.setenv("PAYLATER_SOURCE_URL", pg_url)
    monkeypatch.setenv("PAYLATER_WAREHOUSE_URL", warehouse_url)
    if webhook is not None:
        monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", webhook)
    for var in UNSET:
        monkeypatch.delenv(var, raising=False)
    if pagerduty is not None:
        monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY", FAKE_KEY)
        monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_EVENTS_URL", pagerduty)
    # These tests follow one incident change per run; the hysteresis of the default (3 runs in a
    # row below a level) has a test of its own.
    monkeypatch.setenv("PAYLATER_MONITOR_RESOLVE_AFTER_RUNS", "1")
    return warehouse_url


def queue_a_late_job(pg_url: str) -> None:
    """The worker's tables with one job queued, due for 10 minutes: oldest_queued_age critical."""
    late = datetime.now(UTC) - timedelta(minutes=10)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(WORKER_DDL.read_text())
        conn.execute(
            "INSERT INTO scoring_jobs (user_id, payload, created_at, run_after) VALUES (1, '{}', %s, %s)",
            [late, late],
        )


def write_ledger(warehouse_url: str, finished_at: datetime) -> None:
    """A sync_ledger (contract columns) whose newest fully successful day finished at `finished_at`."""
    import pyarrow as pa

    from tasks.sync import configured_tables
    from tasks.warehouse import open_warehouse

    names = [spec.name for spec in configured_tables()]
    n = len(names)
    ts = pa.timestamp("us", tz="UTC")
    table = pa.table(
        {
            "table_name": names,
            "as_of": pa.array([date(2026, 11, 26)] * n, pa.date32()),
            "mode": ["full"] * n,
            "watermark_from": pa.array([None] * n, ts),
            "watermark_to": pa.array([finished_at] * n, ts),
            "rows_extracted": pa.array([1] * n, pa.int64()),
            "rows_loaded": pa.array([1] * n, pa.int64()),
            "warehouse_rows": pa.array([1] * n, pa.int64()),
            "duration_seconds": [0.1] * n,
            "status": ["succeeded"] * n,
            "error": pa.array([None] * n, pa.string()),
            "finished_at": pa.array([finished_at] * n, ts),
        }
    )
    warehouse = open_warehouse(warehouse_url)
    warehouse.replace_table("sync_ledger", table)
    warehouse.close()


def write_scoring_manifest(
    home: Path,
    built_at: datetime,
    source_url: str,
    published: tuple[date, datetime] | None = None,
) -> None:
    """A complete (manifest-bearing) scoring dataset folder of 2026-11-26 built at `built_at`, and
    the online table in `source_url` as its publish left it: that day, published a second later,
    unless `published` gives another (day, publish time)."""
    folder = home / "datasets" / "scoring" / "as_of=2026-11-26"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "kind": "scoring",
        "as_of": "2026-11-26",
        "rows": 0,
        "schema": [],
        "sha256": "",
        "source_watermark": None,
        "sql_hash": "",
        "features": [],
        "uri": (folder / "part-0.parquet").as_uri(),
        "built_at": built_at.isoformat(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    day, at = published or (date(2026, 11, 26), built_at + timedelta(seconds=1))
    with psycopg.connect(source_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS user_features_latest")
        conn.execute(
            "CREATE TABLE user_features_latest"
            " (user_id bigint PRIMARY KEY, as_of date NOT NULL, updated_at timestamptz NOT NULL)"
        )
        conn.execute("INSERT INTO user_features_latest VALUES (1, %s, %s)", [day, at])


def test_monitor_alerts_once_per_incident_and_resolves(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.monitor import monitor

    warehouse_url = point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url)
    now = datetime.now(UTC)
    queue_a_late_job(pg_url)
    write_ledger(warehouse_url, now - timedelta(hours=40))  # warning (30 h), not critical (54 h)
    write_scoring_manifest(paylater_home, now - timedelta(hours=60), pg_url)  # critical

    monitor()
    fired = {p["subject"]: p for p in receiver.take()}
    assert set(fired) == {
        "[FIRING] paylater critical: oldest_queued_age",
        "[FIRING] paylater warning: sync_age",
        "[FIRING] paylater critical: feature_build_age",
    }
    assert fired["[FIRING] paylater warning: sync_age"]["severity"] == "warning"
    assert fired["[FIRING] paylater critical: oldest_queued_age"]["dedup_key"] == (
        "paylater-monitor/oldest_queued_age"
    )

    monitor()  # the conditions last: nothing new
    assert receiver.take() == []

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE scoring_jobs SET status = 'done', updated_at = now()")
    write_ledger(warehouse_url, datetime.now(UTC) - timedelta(hours=1))
    write_scoring_manifest(paylater_home, datetime.now(UTC) - timedelta(hours=1), pg_url)
    results = {r.check: r.level for r in monitor()}
    resolved = receiver.take()
    assert sorted(p["subject"] for p in resolved) == [
        "[RESOLVED] paylater: feature_build_age",
        "[RESOLVED] paylater: oldest_queued_age",
        "[RESOLVED] paylater: sync_age",
    ]
    assert {p["severity"] for p in resolved} == {"info"}
    assert results["queue_depth"] == "ok" and results["failure_rate"] == "unknown"  # too few jobs

    monitor()
    assert receiver.take() == []


def test_a_value_flapping_around_its_threshold_alerts_once_and_resolves_once(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the default hysteresis, a queue whose oldest job is late one run and not the next
    keeps one incident: FIRING once, and RESOLVED only after 3 clear runs in a row."""
    from flows.monitor import monitor

    point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url)
    monkeypatch.delenv("PAYLATER_MONITOR_RESOLVE_AFTER_RUNS")  # the default

    def queue(late: bool) -> None:
        if late:
            queue_a_late_job(pg_url)
        else:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute("UPDATE scoring_jobs SET status = 'done', updated_at = now()")

    def run() -> list[str]:
        levels = {r.check: r.level for r in monitor()}
        assert levels["oldest_queued_age"] in ("ok", "critical")
        return [p["subject"] for p in receiver.take() if "oldest_queued_age" in p["subject"]]

    queue(late=True)
    assert run() == ["[FIRING] paylater critical: oldest_queued_age"]
    for late in (False, True, False, False):
        queue(late)
        assert run() == [], f"late={late}"  # flapping, then 2 clear runs: held, silent
    with psycopg.connect(pg_url) as conn:
        incident = conn.execute("SELECT runs_ok FROM monitor_incidents").fetchone()
    assert incident is not None, "the incident is still recorded"
    (runs_ok,) = incident
    assert runs_ok == 2
    assert run() == ["[RESOLVED] paylater: oldest_queued_age"]
    assert run() == []


def test_a_run_left_running_pages_as_stuck_naming_run_deployment_and_duration(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    pagerduty: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deployment's run the API shows RUNNING past its deployment's limit
    (PAYLATER_MONITOR_STUCK_RUN_HOURS_BY_DEPLOYMENT, else PAYLATER_MONITOR_STUCK_RUN_HOURS; what a
    run whose host was lost looks like: nobody reports it again) pages, naming the run, its
    deployment, since when and the limit; a run of another deployment within the global limit
    does not count. (The process really vanishing, and the monitor's own run left
    out, are tests/tasks/test_monitoring_flow_runs.py's.)"""
    import asyncio
    import time
    import uuid

    from prefect import flow, get_client
    from prefect.runner import Runner
    from prefect.states import Running

    from flows.monitor import monitor

    point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url, pagerduty.url)
    name = f"paylater-test-stuck-{uuid.uuid4().hex[:8]}"
    # the nightly job's own limit, 2 s; its weekly twin keeps the global 3 h, so is not stuck
    monkeypatch.setenv(
        "PAYLATER_MONITOR_STUCK_RUN_HOURS_BY_DEPLOYMENT", json.dumps({f"{name}/nightly": 2 / 3600})
    )

    @flow(name=name)
    def job() -> None:
        """Never run here: only its deployment's run exists."""

    async def a_run_left_running(deployment: str) -> Any:
        runner = Runner(name=f"r-{uuid.uuid4().hex[:8]}")
        deployment_id = await runner.aadd_flow(job, name=deployment)
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(deployment_id)
            await client.set_flow_run_state(run.id, Running(), force=True)
            return run

    run = asyncio.run(a_run_left_running("nightly"))
    weekly = asyncio.run(a_run_left_running("weekly"))
    try:
        time.sleep(2.5)  # past the 2 s limit (the limit, not an assertion, waits)
        results = {r.check: r for r in monitor()}
        stuck = results["stuck_flow_runs"]
        assert stuck.level == "critical" and stuck.value == 1.0, stuck.summary
        (fired,) = [p for p in receiver.take() if "stuck_flow_runs" in p["subject"]]
        assert fired["subject"] == "[FIRING] paylater critical: stuck_flow_runs"
        assert f"{name}/{run.name} (deployment nightly) running since" in fired["body"]
        assert "(limit 2 s)" in fired["body"] and weekly.name not in fired["body"]
        assert "runbook: docs/runbook.md#stuck_flow_runs" in fired["body"]
        assert [e["event_action"] for e in pagerduty.take()] == ["trigger"]
    finally:
        with get_client(sync_client=True) as client:
            client.delete_flow_run(run.id)
            client.delete_flow_run(weekly.id)


def test_a_stuck_limit_for_a_mistyped_deployment_warns_slack_once_naming_the_deployments(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    pagerduty: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PAYLATER_MONITOR_STUCK_RUN_HOURS_BY_DEPLOYMENT with `nightly_sync` for the deployment
    `nightly-sync` was ignored without a word: that job kept the global limit. The monitor now
    warns on Slack (no page) once, naming the key and the deployments the API has; the other
    checks run as usual, and the warning resolves once the key is fixed."""
    import asyncio
    import uuid

    from prefect import flow
    from prefect.runner import Runner

    from flows.monitor import monitor

    point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url, pagerduty.url)
    name = f"paylater-test-keys-{uuid.uuid4().hex[:8]}"

    @flow(name=name)
    def job() -> None:
        """Never run: only its deployment matters."""

    async def deploy() -> None:
        await Runner(name=f"r-{uuid.uuid4().hex[:8]}").aadd_flow(job, name="nightly-sync")

    asyncio.run(deploy())

    def run(limits: dict[str, float]) -> list[dict]:
        monkeypatch.setenv("PAYLATER_MONITOR_STUCK_RUN_HOURS_BY_DEPLOYMENT", json.dumps(limits))
        results = {r.check: r for r in monitor()}
        assert results["stuck_flow_runs"].level != "unknown"  # still measured
        return [p for p in receiver.take() if "stuck_limit_keys" in p["subject"]]

    (fired,) = run({"nightly_sync": 1.5})
    assert fired["subject"] == "[FIRING] paylater warning: stuck_limit_keys"
    text = json.dumps(fired)
    assert "'nightly_sync'" in text and f"{name}/nightly-sync" in text, text
    assert "runbook: docs/runbook.md#stuck_limit_keys" in text
    assert run({"nightly_sync": 1.5}) == []  # once per incident
    assert pagerduty.take() == []  # a warning: nobody is woken for a typo
    (resolved,) = run({"nightly-sync": 1.5})
    assert resolved["subject"] == "[RESOLVED] paylater: stuck_limit_keys"


def test_a_build_whose_publish_failed_alerts_on_the_online_features_age(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dataset of 2026-11-26 was built an hour ago, but its publish failed: the service still
    scores with the features of 2026-11-25, published 40 hours ago. Judged by the dataset alone,
    the check said ok."""
    from flows.monitor import monitor

    warehouse_url = point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url)
    now = datetime.now(UTC)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(WORKER_DDL.read_text())
    write_ledger(warehouse_url, now - timedelta(hours=1))
    write_scoring_manifest(
        paylater_home,
        now - timedelta(hours=1),
        pg_url,
        published=(date(2026, 11, 25), now - timedelta(hours=40)),
    )
    results = {r.check: r for r in monitor()}
    assert results["feature_build_age"].level == "warning"
    assert results["feature_build_age"].value == pytest.approx(40 * 3600, abs=120)
    (fired,) = receiver.take()
    assert fired["subject"] == "[FIRING] paylater warning: feature_build_age"
    assert "online features as_of 2026-11-25" in fired["body"]
    assert "its publish failed" in fired["body"]


def test_monitor_retries_an_alert_the_webhook_refused(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slack answering 500 must not swallow the FIRING (or the RESOLVED): the next run resends it."""
    from flows.monitor import monitor

    point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url)
    queue_a_late_job(pg_url)

    def subjects() -> list[str]:
        return [p["subject"] for p in receiver.take()]

    receiver.status = 500
    monitor()
    assert subjects() == ["[FIRING] paylater critical: oldest_queued_age"]  # refused
    receiver.status = 200
    monitor()
    assert subjects() == ["[FIRING] paylater critical: oldest_queued_age"]  # sent again
    monitor()
    assert subjects() == []  # delivered once: not again

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE scoring_jobs SET status = 'done', updated_at = now()")
    receiver.status = 500
    monitor()
    assert subjects() == ["[RESOLVED] paylater: oldest_queued_age"]  # refused
    receiver.status = 200
    monitor()
    assert subjects() == ["[RESOLVED] paylater: oldest_queued_age"]  # sent again
    monitor()
    assert subjects() == []


def test_the_heartbeat_is_pinged_only_by_runs_whose_alerts_all_got_through(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The dead-man's switch pages through its own service when the pings stop: the monitor not
    running, or the alerts it owes not getting through."""
    from flows.monitor import monitor

    key = "fake-heartbeat-check-key-0000"
    heartbeat = Receiver()
    try:
        point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url)
        monkeypatch.setenv("PAYLATER_MONITOR_HEARTBEAT_URL", f"{heartbeat.url}/{key}")
        queue_a_late_job(pg_url)

        receiver.status = 500  # Slack refuses the FIRING
        monitor()
        assert len(receiver.take()) == 1 and heartbeat.gets == []  # withheld

        receiver.status = 200
        monitor()  # the FIRING resent and delivered
        assert len(receiver.take()) == 1 and heartbeat.gets == [f"/hook/{key}"]
        monitor()  # nothing owed: still alive
        assert receiver.take() == [] and len(heartbeat.gets) == 2

        heartbeat.status = 503  # the heartbeat service has trouble: the monitor carries on
        caplog.clear()
        results = monitor()
        assert {r.check for r in results} >= {"queue_depth", "oldest_queued_age"}
        assert len(heartbeat.gets) == 3
        logged = caplog.text
        assert "PAYLATER_MONITOR_HEARTBEAT_URL" in logged and "answered 503" in logged
        assert key not in logged, "the check's key must not reach the flow log"
    finally:
        heartbeat.close()


def test_monitor_pages_pagerduty_and_resolves_under_the_same_key(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    pagerduty: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Critical pages (retried while PagerDuty answers 5xx, Slack told once), escalation pages,
    warnings do not, and clearing resolves each page under the key it was triggered with."""
    from flows.monitor import monitor

    warehouse_url = point_monitor_at(
        monkeypatch, pg_url, paylater_home, receiver.url, pagerduty.url
    )
    # The heartbeat pages while a page is refused, so Slack may wait for the page.
    monkeypatch.setenv("PAYLATER_MONITOR_HEARTBEAT_URL", f"{receiver.url}/heartbeat")
    queue_a_late_job(pg_url)
    write_ledger(warehouse_url, datetime.now(UTC) - timedelta(hours=40))  # sync_age: warning

    def slack() -> list[str]:
        return sorted(p["subject"] for p in receiver.take())

    def events() -> list[tuple[str, str]]:
        got = pagerduty.take()
        assert all(e["routing_key"] == FAKE_KEY for e in got)
        return sorted((e["event_action"], e["dedup_key"]) for e in got)

    queue_key, sync_key = "paylater-monitor/oldest_queued_age", "paylater-monitor/sync_age"
    pagerduty.status = 503
    monitor()
    assert events() == [("trigger", queue_key)]  # refused: retryable
    assert slack() == ["[FIRING] paylater warning: sync_age"]  # the critical waits for its page
    pagerduty.status = 202
    monitor()
    assert events() == [("trigger", queue_key)]
    assert slack() == ["[FIRING] paylater critical: oldest_queued_age"]
    monitor()
    assert (events(), slack()) == ([], [])

    write_ledger(warehouse_url, datetime.now(UTC) - timedelta(hours=60))  # sync_age: critical
    monitor()
    assert events() == [("trigger", sync_key)]
    assert slack() == ["[ESCALATED] paylater critical: sync_age"]

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE scoring_jobs SET status = 'done', updated_at = now()")
    write_ledger(warehouse_url, datetime.now(UTC) - timedelta(hours=1))
    pagerduty.status = 500
    monitor()
    assert events() == [("resolve", queue_key), ("resolve", sync_key)]
    assert slack() == []
    pagerduty.status = 202
    monitor()
    assert events() == [("resolve", queue_key), ("resolve", sync_key)]
    assert slack() == ["[RESOLVED] paylater: oldest_queued_age", "[RESOLVED] paylater: sync_age"]
    monitor()
    assert (events(), slack()) == ([], [])


def test_a_critical_incident_back_at_warning_resolves_its_page_not_its_slack_warning(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    pagerduty: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sync_age critical pages; back at warning, PagerDuty gets the resolve (nobody stays paged
    for a warning) and Slack a DE-ESCALATED warning; cleared, Slack alone hears RESOLVED."""
    from flows.monitor import monitor

    warehouse_url = point_monitor_at(
        monkeypatch, pg_url, paylater_home, receiver.url, pagerduty.url
    )
    sync_key = "paylater-monitor/sync_age"

    def seen() -> tuple[list[tuple[str, str]], list[str]]:
        events = [(e["event_action"], e["dedup_key"]) for e in pagerduty.take()]
        slack = [p["subject"] for p in receiver.take() if "sync_age" in p["subject"]]
        return events, slack

    write_ledger(warehouse_url, datetime.now(UTC) - timedelta(hours=60))  # critical (54 h)
    monitor()
    assert seen() == ([("trigger", sync_key)], ["[FIRING] paylater critical: sync_age"])
    write_ledger(warehouse_url, datetime.now(UTC) - timedelta(hours=40))  # warning (30 h)
    monitor()
    assert seen() == ([("resolve", sync_key)], ["[DE-ESCALATED] paylater warning: sync_age"])
    monitor()
    assert seen() == ([], [])
    write_ledger(warehouse_url, datetime.now(UTC) - timedelta(hours=1))
    monitor()
    assert seen() == ([], ["[RESOLVED] paylater: sync_age"])


def test_a_page_pagerduty_accepted_is_resolved_even_while_slack_refuses(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    pagerduty: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slack down must not leave a page open for good: once PagerDuty accepted the trigger, the
    incident exists, so clearing sends the resolve (and no trigger repeats every run meanwhile)."""
    from flows.monitor import monitor

    point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url, pagerduty.url)
    queue_a_late_job(pg_url)
    key = "paylater-monitor/oldest_queued_age"

    def events() -> list[tuple[str, str]]:
        return sorted((e["event_action"], e["dedup_key"]) for e in pagerduty.take())

    receiver.status = 404  # a revoked Slack webhook
    monitor()
    assert events() == [("trigger", key)]
    monitor()
    assert events() == []  # the page is open: not triggered again every 5 minutes

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE scoring_jobs SET status = 'done', updated_at = now()")
    monitor()
    assert events() == [("resolve", key)]
    monitor()
    assert events() == []
    assert len(receiver.take()) == 2  # Slack was tried with each change, once


def test_a_warehouse_that_fails_its_query_leaves_the_other_checks_alerting(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ledger query failing (here a sync_ledger without the contract's columns; in
    production a BigQuery error) makes sync_age unknown, saying why; the stuck queue still pages."""
    import pyarrow as pa

    from flows.monitor import monitor
    from tasks.warehouse import open_warehouse

    warehouse_url = point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url)
    warehouse = open_warehouse(warehouse_url)
    warehouse.replace_table("sync_ledger", pa.table({"note": ["not the ledger"]}))
    warehouse.close()
    queue_a_late_job(pg_url)

    results = {r.check: r for r in monitor()}
    assert [p["subject"] for p in receiver.take()] == [
        "[FIRING] paylater critical: oldest_queued_age"
    ]
    assert results["sync_age"].level == "unknown"
    assert "sync ledger not readable" in results["sync_age"].summary


def test_monitor_deletes_jobs_past_their_retention(
    prefect_harness: None, pg_url: str, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run deletes finished jobs older than PAYLATER_WORKER_RETENTION_DAYS; nothing younger,
    nothing unfinished; 0, nothing at all."""
    from flows.monitor import monitor

    point_monitor_at(monkeypatch, pg_url, paylater_home)
    monkeypatch.setenv("PAYLATER_WORKER_RETENTION_DAYS", "30")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(WORKER_DDL.read_text())
        for status, days in (("done", 40), ("dead", 40), ("done", 20), ("queued", 40)):
            conn.execute(
                "INSERT INTO scoring_jobs (user_id, payload, status, updated_at, run_after)"
                " VALUES (1, '{}', %s, now() - make_interval(days => %s), now())",
                [status, days],
            )
    monitor()
    with psycopg.connect(pg_url) as conn:
        left = conn.execute(
            "SELECT status, extract(day FROM now() - updated_at)::int FROM scoring_jobs ORDER BY 1, 2"
        ).fetchall()
    assert left == [("done", 20), ("queued", 40)]

    monkeypatch.setenv("PAYLATER_WORKER_RETENTION_DAYS", "0")  # kept forever
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO scoring_jobs (user_id, payload, status, updated_at)"
            " VALUES (1, '{}', 'done', now() - interval '400 days')"
        )
    monitor()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM scoring_jobs").fetchone() == (3,)


def test_a_check_unmeasured_past_the_threshold_warns_slack_once_and_resolves(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    pagerduty: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sync_age pages, then its ledger becomes unreadable: its incident stays open; past
    PAYLATER_MONITOR_UNKNOWN_ALERT_MINUTES Slack hears one warning (no page), and a RESOLVED
    notice once the ledger is read again. Time passes by moving the stretch's start back in the
    database each run reads (every run is a fresh process as far as the state goes)."""
    import pyarrow as pa

    from flows.monitor import monitor
    from tasks.warehouse import open_warehouse

    warehouse_url = point_monitor_at(
        monkeypatch, pg_url, paylater_home, receiver.url, pagerduty.url
    )
    monkeypatch.setenv("PAYLATER_MONITOR_UNKNOWN_ALERT_MINUTES", "30")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(WORKER_DDL.read_text())  # an empty queue: measured (rates: too few jobs)
    write_scoring_manifest(paylater_home, datetime.now(UTC) - timedelta(hours=1), pg_url)
    write_ledger(warehouse_url, datetime.now(UTC) - timedelta(hours=60))  # sync_age: critical

    def slack() -> list[str]:
        return sorted(p["subject"] for p in receiver.take())

    def events() -> list[tuple[str, str]]:
        return sorted((e["event_action"], e["dedup_key"]) for e in pagerduty.take())

    def unmeasured_for(minutes: int) -> list[str]:
        """Move every stretch's start `minutes` back; the checks unmeasured now."""
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE monitor_unmeasured SET since = since - make_interval(mins => %s)", [minutes]
            )
            return [r[0] for r in conn.execute("SELECT check_name FROM monitor_unmeasured")]

    monitor()
    assert slack() == ["[FIRING] paylater critical: sync_age"]
    assert events() == [("trigger", "paylater-monitor/sync_age")]

    warehouse = open_warehouse(warehouse_url)
    warehouse.replace_table("sync_ledger", pa.table({"note": ["not the ledger"]}))
    warehouse.close()
    results = {r.check: r for r in monitor()}
    assert results["sync_age"].level == "unknown" and results["failure_rate"].level == "unknown"
    assert (slack(), events()) == ([], [])  # unmeasured since this run: not yet
    assert unmeasured_for(31) == ["sync_age"]  # the quiet queue's rates are not unmeasured
    monitor()
    (warned,) = receiver.take()
    assert warned["subject"] == "[UNMEASURED] paylater warning: sync_age"
    assert warned["severity"] == "warning" and events() == []  # Slack only
    body = warned["body"]  # the reason quoted is DuckDB's error, over two lines
    assert body.startswith("sync_age not measured since ") and "sync ledger not readable" in body
    *_, incident, runbook = body.splitlines()
    assert incident.startswith("its critical incident (open since ")
    assert runbook == "runbook: docs/runbook.md#check_unmeasured"
    assert warned["dedup_key"] == "paylater-monitor/sync_age/unmeasured"

    # the incident stayed as it was (sent once, not twice: tests/tasks/test_monitoring.py)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT check_name, severity FROM monitor_incidents").fetchall() == [
            ("sync_age", "critical")
        ]

    write_ledger(warehouse_url, datetime.now(UTC) - timedelta(hours=1))
    monitor()
    assert slack() == [
        "[RESOLVED] paylater: sync_age",
        "[RESOLVED] paylater: sync_age measured again",
    ]
    assert events() == [("resolve", "paylater-monitor/sync_age")]  # the incident's page only
    assert unmeasured_for(0) == []


@pytest.mark.parametrize(
    "variable",
    [
        # 0 minutes: every check would warn of being unmeasured at its first miss.
        "PAYLATER_MONITOR_UNKNOWN_ALERT_MINUTES",
        # A window of 0 minutes holds no finished job: every run would call the failure rate too
        # sparse to judge, and a queue failing every job would never alert.
        "PAYLATER_MONITOR_WINDOW_MINUTES",
    ],
)
def test_a_setting_of_0_that_cannot_work_fails_the_run_naming_the_variable(
    variable: str,
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused before anything is measured, as thresholds that cannot work are; the run's
    failure alert carries the message."""
    from flows.monitor import monitor

    point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url)
    monkeypatch.setenv(variable, "0")
    with pytest.raises(ValueError, match=f"{variable} must be a number"):
        monitor()
    (failed,) = receiver.take()
    assert "of 'monitor' failed" in failed["subject"]
    assert variable in failed["body"]


def test_an_unreachable_incident_database_fails_the_run_as_before(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The queue database (home of the incident and unmeasured tables) refusing connections:
    no state can be kept, so the run fails, its failure alert goes out and the heartbeat is
    withheld, exactly as before the unmeasured warning existed (which cannot be sent here)."""
    import socket

    from flows.monitor import IncidentStateUnavailable, monitor

    point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url)
    heartbeat = Receiver()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused at once
    try:
        port = closed.getsockname()[1]
        monkeypatch.setenv("PAYLATER_WORKER_DATABASE_URL", f"postgresql://u:p@127.0.0.1:{port}/db")
        monkeypatch.setenv("PAYLATER_MONITOR_HEARTBEAT_URL", heartbeat.url)
        with pytest.raises(IncidentStateUnavailable, match="Connection refused"):
            monitor()
        (failed,) = receiver.take()  # the failure alert, and nothing else
        assert failed["subject"].endswith("of 'monitor' failed")
    finally:
        closed.close()
        heartbeat.close()
    assert heartbeat.gets == []


def test_a_monitor_failing_run_after_run_tells_slack_once_until_a_run_completes(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The monitor runs every 5 minutes: a cause that fails it (a setting, the queue database
    down) failed every run, and each run's failure hook told Slack again, 12 times an hour, all
    night. The same failure as the previous finished run is told once; a different one, or the
    first after a run that completed, is told."""
    from flows.monitor import monitor

    point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url)
    # Values no other test uses: their failure messages are this test's own.
    monkeypatch.setenv("PAYLATER_MONITOR_UNKNOWN_ALERT_MINUTES", "-4.25")
    for _ in range(3):
        with pytest.raises(ValueError):
            monitor()
    (failed,) = receiver.take()
    assert "PAYLATER_MONITOR_UNKNOWN_ALERT_MINUTES" in failed["body"]
    monkeypatch.delenv("PAYLATER_MONITOR_UNKNOWN_ALERT_MINUTES")
    monkeypatch.setenv("PAYLATER_MONITOR_WINDOW_MINUTES", "-6")  # another failure: told
    with pytest.raises(ValueError):
        monitor()
    (other,) = receiver.take()
    assert "PAYLATER_MONITOR_WINDOW_MINUTES" in other["body"]
    monkeypatch.delenv("PAYLATER_MONITOR_WINDOW_MINUTES")
    monitor()  # completes
    receiver.take()  # whatever the checks said
    monkeypatch.setenv("PAYLATER_MONITOR_UNKNOWN_ALERT_MINUTES", "-4.25")
    with pytest.raises(ValueError):
        monitor()
    (again,) = [p for p in receiver.take() if "of 'monitor' failed" in p["subject"]]
    assert "PAYLATER_MONITOR_UNKNOWN_ALERT_MINUTES" in again["body"]


def test_without_a_heartbeat_slack_hears_a_critical_alert_pagerduty_refuses(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    pagerduty: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no heartbeat configured (the default), nothing else pages while PagerDuty answers
    5xx: holding Slack back until the page went through left the critical alert unheard for the
    whole PagerDuty outage. Slack is told, marked NOT PAGED, and the page is still resent."""
    from flows.monitor import monitor

    point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url, pagerduty.url)
    monkeypatch.delenv("PAYLATER_MONITOR_HEARTBEAT_URL", raising=False)
    queue_a_late_job(pg_url)
    key = "paylater-monitor/oldest_queued_age"
    pagerduty.status = 503
    monitor()
    assert [(e["event_action"], e["dedup_key"]) for e in pagerduty.take()] == [("trigger", key)]
    (told,) = [p for p in receiver.take() if "oldest_queued_age" in p["subject"]]
    assert told["subject"] == "[FIRING] paylater critical: oldest_queued_age"
    assert "NOT PAGED" in told["text"] and "503" in told["text"]
    pagerduty.status = 202
    monitor()  # resent: paged now
    assert [(e["event_action"], e["dedup_key"]) for e in pagerduty.take()] == [("trigger", key)]
    monitor()
    assert pagerduty.take() == []


def test_an_unreachable_queue_database_fails_the_run_naming_it_and_what_was_judged(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The queue database keeps the incident state: unreachable, the run fails (no state can be
    kept), and its failure alert was psycopg's bare "connection failed: … Connection refused",
    naming neither the database's role nor its setting, while the checks the run did judge (a
    sync 60 h late: critical) went unsaid until the database came back. The alert now names the
    database, its setting and its role, and lists the checks judged critical or warning; the
    same state the next run is not told again, and no password is shown."""
    import socket

    from flows.monitor import IncidentStateUnavailable, monitor

    warehouse_url = point_monitor_at(monkeypatch, pg_url, paylater_home, receiver.url)
    write_ledger(warehouse_url, datetime.now(UTC) - timedelta(hours=60))  # sync_age: critical
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused at once
    try:
        port = closed.getsockname()[1]
        monkeypatch.setenv(
            "PAYLATER_WORKER_DATABASE_URL", f"postgresql://u:Wr0ngSecret@127.0.0.1:{port}/db"
        )
        for _ in range(2):
            with pytest.raises(IncidentStateUnavailable, match="Connection refused"):
                monitor()
        (failed,) = receiver.take()  # told once
    finally:
        closed.close()
    body = failed["body"]
    assert failed["subject"].endswith("of 'monitor' failed")
    assert "the queue database PAYLATER_WORKER_DATABASE_URL" in body, body
    assert f"127.0.0.1:{port}/db" in body and "incident state" in body
    assert "critical: sync_age" in body, body
    assert "Wr0ngSecret" not in body


class Silent:
    """A receiver that accepts connections (the kernel completes each handshake) and never
    answers: a hung Slack, a proxy that lost its upstream. `connections()` counts those made."""

    def __init__(self) -> None:
        import socket

        self.socket = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.socket.setblocking(False)  # only drained by connections(), never answered
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/hook"
        self.accepted: list[Any] = []

    def connections(self) -> int:
        """How many connections were made to it so far (each one's handshake done)."""
        while True:
            try:
                self.accepted.append(self.socket.accept()[0])
            except BlockingIOError:
                return len(self.accepted)

    def close(self) -> None:
        """Close every connection and the listening socket."""
        for conn in self.accepted:
            conn.close()
        self.socket.close()


def test_a_slack_that_never_answers_is_waited_on_once_per_pass_and_pages_still_go_out(
    prefect_harness: None,
    pg_url: str,
    paylater_home: Path,
    receiver: Receiver,
    pagerduty: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each delivery is bounded by the deadline, but a pass delivered its notices one after the
    other: a Slack accepting connections and never answering held the pass (and its incident
    locks) for one deadline per notice. Once a channel timed out, the pass's later notices do not
    wait on it again: they count as not delivered (resent by the next pass), pages still go out."""
    import tasks.alerts
    from flows import monitor as monitor_flow

    silent = Silent()
    try:
        warehouse_url = point_monitor_at(
            monkeypatch, pg_url, paylater_home, silent.url, pagerduty.url
        )
        # Lowered to keep the test short, not so far that a loaded machine's real receivers miss it.
        monkeypatch.setattr(tasks.alerts, "DELIVERY_DEADLINE_SECONDS", 2.0)
        monkeypatch.setenv("PAYLATER_MONITOR_HEARTBEAT_URL", f"{receiver.url}/heartbeat")
        queue_a_late_job(pg_url)  # oldest_queued_age: critical
        write_ledger(warehouse_url, datetime.now(UTC) - timedelta(hours=40))  # sync_age: warning
        write_scoring_manifest(paylater_home, datetime.now(UTC) - timedelta(hours=60), pg_url)

        monitor_flow.monitor()
        assert silent.connections() == 1, "Slack waited on once, not once per notice"
        paged = sorted(e["dedup_key"] for e in pagerduty.take())
        assert paged == ["paylater-monitor/feature_build_age", "paylater-monitor/oldest_queued_age"]
        assert receiver.gets == []  # a notice owed was not delivered: the heartbeat is withheld
    finally:
        silent.close()

    # Slack back: the warning the dead Slack kept is resent; the paged incidents stay as they are.
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", receiver.url)
    monitor_flow.monitor()
    assert [p["subject"] for p in receiver.take()] == ["[FIRING] paylater warning: sync_age"]
    assert pagerduty.take() == [] and len(receiver.gets) == 1
