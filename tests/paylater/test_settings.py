"""Settings resolve embedded defaults under PAYLATER_HOME and honour explicit URLs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from paylater.settings import get_settings


def test_defaults_live_under_home(paylater_home: Path) -> None:
    s = get_settings()
    assert s.source == f"sqlite:///{paylater_home / 'source.db'}"
    assert s.warehouse == f"duckdb:///{paylater_home / 'warehouse.duckdb'}"
    assert s.datasets == (paylater_home / "datasets").as_uri()
    assert s.tracking_uri == f"sqlite:///{paylater_home / 'mlflow.db'}"


def test_explicit_urls_win(paylater_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYLATER_WAREHOUSE_URL", "bigquery://proj/ds")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    s = get_settings()
    assert s.warehouse == "bigquery://proj/ds"
    assert s.tracking_uri == "http://127.0.0.1:5000"


def test_settings_follow_the_environment_as_it_changes(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsed settings are reused only while the environment is unchanged, and cannot be edited."""
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("PAYLATER_TIMEZONE", "UTC")
    assert get_settings().timezone == "UTC"
    monkeypatch.delenv("PAYLATER_TIMEZONE")
    assert get_settings().timezone == first.timezone
    with pytest.raises(ValidationError):
        first.timezone = "UTC"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PAYLATER_DECISION_CUTOFF", "20"),  # meant as 20 %: every candidate would approve all
        ("PAYLATER_DECISION_CUTOFF", "-0.1"),
        ("PAYLATER_DECISION_CUTOFF", "nan"),
        ("PAYLATER_GOLDEN_REQUEST_COUNT", "0"),  # a version nobody could ever verify
        ("PAYLATER_TRAIN_EARLY_STOPPING_SHARE", "1"),  # every in-time charge would stop, none fit
        ("PAYLATER_TRAIN_NUM_THREADS", "0"),  # LightGBM's "all cores": not reproducible elsewhere
        ("PAYLATER_TRAIN_LEARNING_RATE", "0"),
        ("PAYLATER_TRAIN_FEATURE_FRACTION", "1.5"),
        ("PAYLATER_TRAIN_NUM_LEAVES", "1"),
        ("PAYLATER_TRAIN_MAX_BIN", "1"),
        ("PAYLATER_TRAIN_NUM_BOOST_ROUND", "0"),
        ("PAYLATER_TRAIN_EARLY_STOPPING_ROUNDS", "0"),
        ("PAYLATER_TRAIN_LAMBDA_L2", "-1"),
        ("PAYLATER_TRAIN_MIN_DATA_IN_LEAF", "-5"),
        ("PAYLATER_GATE_MIN_AUC", "65"),  # meant as 65 %: no candidate would ever pass
        ("PAYLATER_GATE_MAX_ECE", "-0.01"),
        ("PAYLATER_GATE_MAX_SCORE_PSI", "-1"),
        ("PAYLATER_MONITOR_REPORT_DAYS", "0"),
        ("PAYLATER_WORKER_METRICS_PORT", "70000"),
        ("PAYLATER_WORKER_METRICS_PORT", "0"),
    ],
)
def test_nonsense_values_are_refused_naming_the_variable(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """A value no run could use is refused when the settings are read, not after hours of work
    (a retrain registering a version whose cutoff the service then refuses to load)."""
    from paylater.cli import error_line

    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        get_settings()
    assert error_line(refused.value).startswith(f"{variable}: ")


def test_sensible_edge_values_are_accepted(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable, value in [
        ("PAYLATER_DECISION_CUTOFF", "0"),
        ("PAYLATER_GOLDEN_REQUEST_COUNT", "1"),
        ("PAYLATER_TRAIN_EARLY_STOPPING_SHARE", "2"),
        ("PAYLATER_TRAIN_FEATURE_FRACTION", "1"),
        ("PAYLATER_TRAIN_LAMBDA_L2", "0"),
        ("PAYLATER_TRAIN_MIN_DATA_IN_LEAF", "0"),
        ("PAYLATER_GATE_MAX_AUC_DROP", "-0.01"),  # the candidate must beat production by 0.01
        ("PAYLATER_WORKER_METRICS_PORT", "65535"),
    ]:
        monkeypatch.setenv(variable, value)
    s = get_settings()
    assert (s.decision_cutoff, s.train_early_stopping_share, s.worker_metrics_port) == (0, 2, 65535)


def test_the_settings_repr_shows_no_credential(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings printed (a debugger, a log line, a traceback's locals) show every URL's host
    and no password, token or webhook path."""
    for name, value in {
        "PAYLATER_SOURCE_URL": "postgresql://app:Wr0ngSecret1@db:5432/ops",
        "PAYLATER_WORKER_DATABASE_URL": "postgresql://w:Wr0ngSecret2@q/queue",
        "MLFLOW_TRACKING_URI": "https://ml:Wr0ngSecret3@mlflow.internal",
        "PAYLATER_ALERT_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/Wr0ngSecret4",
        "PAYLATER_MONITOR_HEARTBEAT_URL": "https://hc-ping.com/Wr0ngSecret5",
        "PAYLATER_API_TOKEN": "Wr0ngSecret6",
        "PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY": "Wr0ngSecret7",
        "PAYLATER_WORKER_SCORING_URL": "http://bento:Wr0ngSecret8@127.0.0.1:3000",
    }.items():
        monkeypatch.setenv(name, value)
    settings = get_settings()
    for shown in (repr(settings), str(settings)):
        assert "Wr0ngSecret" not in shown, shown
        assert "db:5432/ops" in shown and "mlflow.internal" in shown and "hc-ping.com" in shown
    assert settings.api_token == "Wr0ngSecret6"  # the value itself is unchanged
