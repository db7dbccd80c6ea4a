"""monthly_retrain end to end on a tiny synthetic dataset: trained, logged, registered, gated, staged."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest


@pytest.fixture
def retrain_home(
    prefect_harness: None, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """PAYLATER_HOME with an empty MLflow registry; no bento build, one training thread."""
    from registry.testing import empty_mlflow_db

    empty_mlflow_db(paylater_home / "mlflow.db")
    monkeypatch.setenv("PAYLATER_REGISTRY_BUILD_BENTO", "false")
    monkeypatch.setenv("PAYLATER_TRAIN_NUM_THREADS", "1")
    return paylater_home


def test_monthly_retrain_stages_the_first_model(
    retrain_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.monthly_retrain import monthly_retrain
    from registry.store import MODEL_NAME, TRAINING_EXPERIMENT, client
    from registry.testing import (
        as_of_after,
        synthetic_training_table,
        write_dataset,
        write_truth,
    )

    monkeypatch.setenv("PAYLATER_GATE_MAX_ECE", "0.05")
    table, truth = synthetic_training_table(10_000, date(2025, 1, 1), 4, seed=21)
    as_of = as_of_after(date(2025, 1, 1), 4)
    manifest = write_dataset(table, as_of)
    write_truth(table, truth, retrain_home)

    report = monthly_retrain(as_of=as_of, issue="4")

    assert report.status == "staged", report.reasons
    assert report.oot_month == date(2025, 4, 1)
    assert {"auc", "pr_auc", "ks", "log_loss", "brier", "ece", "oracle_auc", "oracle_ece"} <= set(
        report.metrics
    )
    assert report.metrics["oracle_rows_share"] == 1.0
    assert report.bento.startswith("skipped")
    c = client()
    mv = c.get_model_version(MODEL_NAME, report.version)
    assert mv.current_stage == "Staging" and mv.tags["issue"] == "4"
    assert mv.tags["dataset_digest"] == manifest.sha256
    run = c.get_run(report.run_id)
    assert run.data.tags["issue"] == "4" and run.data.params["oot_month"] == "2025-04-01"
    training = c.get_experiment_by_name(TRAINING_EXPERIMENT)
    assert training is not None and run.info.experiment_id == training.experiment_id
    assert run.inputs is not None, "the run logged no inputs"
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == [manifest.sha256[:32]]
    artifacts = {a.path for a in c.list_artifacts(report.run_id, "plots")}
    assert artifacts == {
        f"plots/{n}.png" for n in ("roc", "calibration", "feature_importance", "score_distribution")
    }
    assert {a.path for a in c.list_artifacts(report.run_id, "golden")} == {"golden/requests.json"}
    # Drift of the out-of-time month against the fitting rows, per feature and of the scores.
    assert {a.path for a in c.list_artifacts(report.run_id, "drift")} == {"drift/psi.json"}
    psi = {k: v for k, v in run.data.metrics.items() if k.startswith("psi.")}
    assert {"psi.max", "psi.score"} <= set(psi) and len(psi) > 2
    assert all(v >= 0 for v in psi.values())
    assert (retrain_home / "mlartifacts").is_dir(), (
        "artifacts stay under PAYLATER_HOME, not ./mlruns"
    )


def test_a_retrain_failing_after_registration_leaves_its_version_rejected(
    retrain_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.monthly_retrain import monthly_retrain
    from registry.store import MODEL_NAME, client
    from registry.testing import (
        as_of_after,
        synthetic_training_table,
        write_dataset,
    )

    table, _ = synthetic_training_table(4_000, date(2025, 1, 1), 3, seed=22)
    write_dataset(table, as_of_after(date(2025, 1, 1), 3))

    def unavailable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tracking server unavailable")

    # The version is registered, then the next MLflow call fails before the gates are recorded.
    monkeypatch.setattr("tasks.drift.log_drift_to_mlflow", unavailable)
    with pytest.raises(RuntimeError, match="tracking server unavailable"):
        monthly_retrain(as_of=None, issue=None)

    (mv,) = client().search_model_versions(f"name='{MODEL_NAME}'")
    assert mv.current_stage == "None"
    assert mv.tags.get("gate_status") == "rejected", "a version whose gates never ran looks ungated"
    assert "tracking server unavailable" in mv.tags["gate_reasons"]


def test_a_retrain_failing_while_tagging_its_new_version_leaves_it_rejected(
    retrain_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from flows.monthly_retrain import monthly_retrain
    from registry.store import MODEL_NAME, client
    from registry.testing import as_of_after, synthetic_training_table, write_dataset

    table, _ = synthetic_training_table(4_000, date(2025, 1, 1), 3, seed=23)
    write_dataset(table, as_of_after(date(2025, 1, 1), 3))
    real_set_tag = MlflowClient.set_model_version_tag
    calls: list[str] = []

    def fails_once(self: MlflowClient, name: str, version: str, key: str, value: str) -> None:
        calls.append(key)
        if len(calls) == 1:
            raise RuntimeError("tracking server answered 503")
        real_set_tag(self, name, version, key, value)

    # log_model has registered the version; the first lineage tag then fails to land.
    monkeypatch.setattr(MlflowClient, "set_model_version_tag", fails_once)
    with pytest.raises(RuntimeError, match="answered 503"):
        monthly_retrain(as_of=None, issue=None)

    (mv,) = client().search_model_versions(f"name='{MODEL_NAME}'")
    assert mv.current_stage == "None"
    assert mv.tags.get("gate_status") == "rejected", "a version whose gates never ran looks ungated"
    assert "answered 503" in mv.tags["gate_reasons"]


def test_a_retrain_whose_tracking_server_is_down_stops_before_training(
    retrain_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from flows.monthly_retrain import monthly_retrain
    from registry.store import RegistryError
    from registry.testing import as_of_after, synthetic_training_table, write_dataset

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    table, _ = synthetic_training_table(4_000, date(2025, 1, 1), 3, seed=24)
    write_dataset(table, as_of_after(date(2025, 1, 1), 3))
    trained: list[object] = []
    monkeypatch.setattr("flows.monthly_retrain.train_booster", lambda *args: trained.append(args))

    with pytest.raises(RegistryError, match=f"{url} is unreachable.*nothing was trained"):
        monthly_retrain(as_of=None, issue=None)
    assert trained == []


def test_a_gate_rejection_alert_ends_with_its_runbook_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like every monitor notice, the rejection points at the runbook section that says what to do."""
    import flows.monthly_retrain
    from registry.policy import GateDecision

    sent: list[tuple] = []
    monkeypatch.setattr(flows.monthly_retrain, "alert", lambda *a, **kw: sent.append((a, kw)))
    flows.monthly_retrain.alert_rejection.fn("7", GateDecision(passed=False, reasons=["auc fell"]))
    (((_subject, body), _),) = sent
    assert body.splitlines() == ["auc fell", "runbook: docs/runbook.md#gate_rejection"]
