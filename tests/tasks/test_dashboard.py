"""The HTML report is self-contained and its plots render in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from tasks.dashboard import PLOT_IDS, DashboardData, render_dashboard, write_dashboard

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium missing (apt-get install chromium; scripts/ensure_test_tools.sh does it)",
)
NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)


def sample_data() -> DashboardData:
    """Two weeks of production scoring, a drift run with one drifted feature, three vintages."""
    days = [date(2026, 11, 13) + timedelta(days=i) for i in range(14)]
    daily = [
        {
            "day": d,
            "scored": 1000 + i,
            "score_p10": 0.02,
            "score_p50": 0.05 + i * 0.002,
            "score_p90": 0.2,
            "approval_rate": 0.9 - i * 0.01,
            "latency_p50_s": 0.01,
            "latency_p99_s": 0.04 + i * 0.001,
        }
        for i, d in enumerate(days)
    ]
    psi = [
        {"as_of": date(2026, 11, 26), "feature": "spend_30d", "psi": 0.31},
        {"as_of": date(2026, 11, 26), "feature": "__score__", "psi": 0.12},
        {"as_of": date(2026, 11, 26), "feature": "tx_count_30d", "psi": 0.02},
    ]
    vintages = [
        {
            "request_month": date(2026, m, 1),
            "charges": 500,
            "default_rate": 0.08,
            "auc": 0.7 + m / 100,
            "in_sample": m < 8,
        }
        for m in (6, 7, 8)
    ]
    incidents = [
        {
            "check_name": "sync_age",
            "severity": "warning",
            "summary": "<b>late</b>",
            "opened_at": NOW,
        }
    ]
    return DashboardData(NOW, daily, psi, vintages, incidents, notes=["note & more"])


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with no network chatter and a fresh profile."""
    assert CHROMIUM is not None
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=60)


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    document = render_dashboard(sample_data())
    for plot_id in PLOT_IDS:
        assert re.search(rf'<figure id="{plot_id}"><svg[^>]*id="{plot_id}-svg"', document)
    # nothing to fetch: no scripts, no external links or images (SVG namespaces are only names)
    assert "<script" not in document and "https://" not in document
    assert not re.search(r'(src|href)="(?!#|data:)', document)
    assert "http://" not in re.sub(r'xmlns(:\w+)?="http://www\.w3\.org/[^"]*"', "", document)
    assert "&lt;b&gt;late&lt;/b&gt;" in document and "note &amp; more" in document
    path = write_dashboard(document, tmp_path / "reports", date(2026, 11, 26))
    assert path.name == "monitoring-2026-11-26.html"
    assert (tmp_path / "reports" / "monitoring-latest.html").read_text() == document


def test_empty_report_says_why_each_plot_is_empty() -> None:
    document = render_dashboard(DashboardData(NOW))
    for message in ("no production scores yet", "no drift run yet", "no matured vintages yet"):
        assert message in document


@needs_chromium
def test_plots_render_in_headless_chromium(tmp_path: Path) -> None:
    from PIL import Image

    path = write_dashboard(
        render_dashboard(sample_data()), tmp_path / "reports", date(2026, 11, 26)
    )
    dom = chromium(["--dump-dom", path.as_uri()], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for plot_id in PLOT_IDS:
        figure = re.search(rf'<figure id="{plot_id}">(.*?)</figure>', dom.stdout, re.S)
        assert figure is not None, f"{plot_id} missing from the rendered DOM"
        assert f'id="{plot_id}-svg"' in figure.group(1) and "<path" in figure.group(1)

    shot = tmp_path / "shot.png"
    run = chromium(
        ["--window-size=1200,3200", "--hide-scrollbars", f"--screenshot={shot}", path.as_uri()],
        tmp_path / "profile-shot",
    )
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    non_white = (pixels.sum(axis=1) < 740).mean()
    assert non_white > 0.02, f"screenshot nearly blank ({non_white:.3%} non-white pixels)"

    def share_near(rgb: tuple[int, int, int]) -> float:
        return float((np.abs(pixels - np.array(rgb)).sum(axis=1) < 30).mean())

    assert share_near((0x1F, 0x77, 0xB4)) > 1e-4, "matplotlib's line colour not drawn"
    assert share_near((0xC0, 0x39, 0x2B)) > 1e-4, "the critical PSI bar not drawn"


def test_drift_of_a_handful_of_rows_is_not_judged() -> None:
    """Sampling noise of 30 values alone gives a critical PSI: no page without real drift."""
    import pyarrow as pa

    from paylater.settings import Settings
    from tasks.dashboard import DailyMonitoring, drift_measurements
    from tasks.drift import drift_report
    from tasks.monitoring import judge

    rng = np.random.default_rng(11)

    def sample(n: int) -> np.ndarray:
        return rng.beta(2, 20, n)  # the same distribution on both sides: no drift at all

    def daily(current_rows: int, score_rows: int) -> DailyMonitoring:
        drift = drift_report(
            pa.table({"spend_30d": sample(3000)}),
            pa.table({"spend_30d": sample(current_rows)}),
            reference_scores=sample(3000),
            current_scores=sample(score_rows),
        )
        return DailyMonitoring(
            date(2026, 11, 26), drift, score_rows=score_rows, reference_score_rows=3000
        )

    tiny = daily(30, 30)
    assert tiny.drift is not None and tiny.drift.score_psi is not None
    assert min(tiny.drift.feature_psi["spend_30d"], tiny.drift.score_psi) > 0.25  # the noise
    levels = {r.check: r for r in judge(drift_measurements(tiny), Settings())}
    assert {c: r.level for c, r in levels.items()} == {
        "feature_psi_max": "unknown",
        "score_psi": "unknown",
    }
    assert "30 production scores" in levels["score_psi"].summary
    assert "30 scoring rows" in levels["feature_psi_max"].summary
    enough = {r.check: r.level for r in judge(drift_measurements(daily(3000, 1000)), Settings())}
    assert enough == {"feature_psi_max": "ok", "score_psi": "ok"}


def test_feature_drift_reference_is_the_scoring_snapshot_of_the_training_day() -> None:
    """The newest snapshot at or before the model's training day, else the oldest after it,
    never the current snapshot itself."""
    from tasks.dashboard import reference_day

    days = [date(2026, 9, 1), date(2026, 10, 1), date(2026, 10, 5), date(2026, 11, 26)]
    current = date(2026, 11, 26)
    assert reference_day(days, date(2026, 10, 3), current) == date(2026, 10, 1)
    assert reference_day(days, date(2026, 10, 5), current) == date(2026, 10, 5)
    assert reference_day(days, date(2026, 8, 1), current) == date(2026, 9, 1)  # none before
    assert reference_day(days, date(2026, 12, 1), current) == date(2026, 10, 5)
    assert reference_day([current], date(2026, 10, 3), current) is None


def test_an_ignored_feature_is_shown_but_not_alerted_on() -> None:
    """Days since the last top-up jump with the payday cycle: its PSI stays in the report, out
    of the alert, which judges the worst of the others."""
    import pyarrow as pa

    from paylater.settings import Settings
    from tasks.dashboard import DailyMonitoring, drift_measurements
    from tasks.drift import drift_report
    from tasks.monitoring import judge

    rng = np.random.default_rng(5)
    same = rng.normal(0, 1, 2000)
    reference = pa.table({"topup_days_since_last": np.full(2000, 2.0), "spend_30d": same})
    current = pa.table({"topup_days_since_last": np.full(2000, 12.0), "spend_30d": same})
    daily = DailyMonitoring(date(2026, 11, 26), drift_report(reference, current))
    assert daily.drift is not None and daily.drift.feature_psi["topup_days_since_last"] > 5
    settings = Settings()
    assert settings.monitor_psi_ignore == ["topup_days_since_last"]
    feature, score = drift_measurements(daily, settings.monitor_psi_ignore)
    assert feature.value == 0.0 and "not alerted on: topup_days_since_last" in feature.detail
    assert score.value is None  # no scores given
    unfiltered, _ = drift_measurements(daily)
    assert [r.level for r in judge([unfiltered], settings)] == ["critical"]


def test_score_psi_reads_only_the_production_versions_scores(pg_url: str) -> None:
    """The day after a promotion (or a rollback), the last day of scoring_results holds both
    versions' scores; the reference is the new version's scores of its training requests, so the
    old version's scores would read as drift (a page) when nothing moved."""
    import psycopg
    import sqlalchemy as sa

    from tasks.dashboard import recent_production_scores
    from tasks.drift import psi

    schema = Path(__file__).resolve().parents[2] / "worker" / "schema.sql"
    rng = np.random.default_rng(7)
    reference = rng.uniform(0.0, 0.2, 2000)  # the new version's scores of its training requests
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(schema.read_text())
        for version, low, high, hours in (("1", 0.5, 0.9, 20), ("2", 0.0, 0.2, 2)):
            for p in rng.uniform(low, high, 400):
                [(job,)] = conn.execute(
                    "INSERT INTO scoring_jobs (user_id, payload, status) VALUES (1, '{}', 'done')"
                    " RETURNING id"
                ).fetchall()
                conn.execute(
                    "INSERT INTO scoring_results"
                    " (job_id, probability, decision, model_version, reason_codes, scored_at)"
                    " VALUES (%s, %s, 'approve', %s, '[]', %s)",
                    [job, float(p), version, NOW - timedelta(hours=hours)],
                )
    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        scores = recent_production_scores(engine, NOW - timedelta(days=1), "2")
    finally:
        engine.dispose()
    assert len(scores) == 400
    assert psi(reference, scores) < 0.1


def test_reports_written_at_once_never_leave_a_mixed_or_missing_file(tmp_path: Path) -> None:
    """Two monitoring-report runs finishing together (a backfill's days): each write goes through
    a scratch file of its own, so neither renames the other's half-written one, nor fails."""
    import threading

    from tasks.dashboard import write_dashboard

    documents = {name: name * 2_000_000 for name in ("a", "b")}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def writer(document: str) -> None:
        start.wait()
        try:
            for _ in range(30):
                write_dashboard(document, tmp_path, date(2026, 11, 26))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(d,)) for d in documents.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for name in ("monitoring-2026-11-26.html", "monitoring-latest.html"):
        assert (tmp_path / name).read_text() in documents.values()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "monitoring-2026-11-26.html",
        "monitoring-latest.html",
    ]


def test_a_drift_check_with_nothing_to_judge_yet_is_not_taken_for_a_fault() -> None:
    """Only a fault (an empty snapshot, a model that cannot be loaded or scored) makes a drift
    check unmeasured, which Slack hears of; no earlier snapshot (a new system), no production
    model and too few rows are nothing to judge yet, each saying so, not "worst: "."""
    import pyarrow as pa

    from paylater.settings import Settings
    from tasks.dashboard import DailyMonitoring, drift_measurements
    from tasks.drift import drift_report
    from tasks.monitoring import judge

    current = pa.table({"spend_30d": np.linspace(0, 1, 500)})

    def results(daily: DailyMonitoring) -> dict[str, tuple[bool, str]]:
        judged = judge(drift_measurements(daily), Settings())
        return {r.check: (r.unmeasured, r.detail) for r in judged}

    day = date(2026, 11, 26)
    new_system = DailyMonitoring(day, drift_report(current.slice(0, 0), current))
    assert results(new_system) == {
        "feature_psi_max": (
            False,
            "no scoring snapshot before as_of 2026-11-26 to measure feature drift from",
        ),
        "score_psi": (False, "no production model: no score PSI"),
    }
    few = DailyMonitoring(day, drift_report(current.slice(0, 20), current), reference_day=day)
    assert results(few)["feature_psi_max"][0] is False
    empty = DailyMonitoring(
        day,
        drift_report(current.slice(0, 0), current),
        reference_day=date(2026, 10, 1),
        model_version="3",
        unmeasured={
            "feature_psi_max": "the reference scoring snapshot as_of 2026-10-01 has no rows",
            "score_psi": "production model not loadable: registry down",
        },
    )
    assert results(empty) == {
        "feature_psi_max": (True, "the reference scoring snapshot as_of 2026-10-01 has no rows"),
        "score_psi": (True, "production model not loadable: registry down"),
    }
