"""PSI and vintage numbers against hand computations."""

from __future__ import annotations

import json
import math
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tasks.drift import (
    EPSILON,
    auc,
    bin_shares,
    drift_report,
    drift_rows,
    log_drift_to_mlflow,
    psi,
    quantile_edges,
    vintage_performance,
)


def test_psi_matches_hand_computation_with_null_bin_and_empty_bin() -> None:
    # reference 1,2,3,4,NULL with 2 bins: median 2.5 -> bins (-inf,2.5], (2.5,inf), NULL
    # shares: reference 2/5, 2/5, 1/5; current [1,1,1,5]: 3/4, 1/4, 0 -> epsilon
    reference = [1.0, 2.0, 3.0, 4.0, None]
    current = [1.0, 1.0, 1.0, 5.0]
    expected = (
        (0.75 - 0.4) * math.log(0.75 / 0.4)
        + (0.25 - 0.4) * math.log(0.25 / 0.4)
        + (EPSILON - 0.2) * math.log(EPSILON / 0.2)
    )
    assert psi(reference, current, bins=2) == pytest.approx(expected, rel=1e-12)


def test_psi_bins_are_right_closed_and_ties_collapse() -> None:
    # 6 of 10 reference values are 0: deciles 0.1..0.6 are all 0 -> one bin (-inf, 0]
    reference = np.array([0, 0, 0, 0, 0, 0, 1, 2, 3, 4], dtype=float)
    edges = quantile_edges(reference, 10)
    assert edges[0] == 0.0 and np.all(np.diff(edges) > 0)
    assert psi(reference, reference.copy()) == pytest.approx(0.0, abs=1e-12)
    # a value equal to an edge belongs to the bin that edge closes
    assert bin_shares(np.array([0.0, edges[1]]), edges).tolist()[:2] == [0.5, 0.5]
    shifted = np.zeros(10)
    value = psi(reference, shifted)
    # reference bins: (-inf,0]=.6, then each remaining value in its own bin (.1 each), >max empty, NULL empty
    hand = (1 - 0.6) * math.log(1 / 0.6) + 4 * (EPSILON - 0.1) * math.log(EPSILON / 0.1)
    assert value == pytest.approx(hand, rel=1e-12)


def test_psi_rejects_empty_samples() -> None:
    with pytest.raises(ValueError, match="both sides"):
        psi([], [1.0])


def test_drift_report_uses_shared_numeric_features_and_score() -> None:
    rng = np.random.default_rng(7)
    reference = pa.table(
        {
            "charge_id": pa.array(range(500), pa.int64()),
            "request_amount_jpy": pa.array(rng.integers(1000, 9000, 500), pa.int64()),
            "tx_count_30d": pa.array(rng.poisson(5, 500), pa.int64()),
            "spend_30d": pa.array(rng.normal(0, 1, 500)),
            "label_default": pa.array([0] * 500, pa.int8()),
        }
    )
    current = pa.table(
        {
            "user_id": pa.array(range(400), pa.int64()),
            "tx_count_30d": pa.array(rng.poisson(5, 400), pa.int64()),
            "spend_30d": pa.array(rng.normal(1.0, 1, 400)),  # shifted by one sd
        }
    )
    report = drift_report(reference, current, reference_scores=[0.1, 0.2], current_scores=[0.9])
    assert set(report.feature_psi) == {"tx_count_30d", "spend_30d"}
    assert report.feature_psi["spend_30d"] > 0.25 > report.feature_psi["tx_count_30d"]
    assert report.score_psi is not None and report.score_psi > 0
    rows = drift_rows(report, date(2026, 11, 26))
    assert rows.num_rows == 3 and "__score__" in rows.column("feature").to_pylist()
    with pytest.raises(ValueError, match="missing"):
        drift_report(reference, current, features=["request_amount_jpy"])


def test_auc_matches_pairwise_count_with_ties() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.3, 0.2])
    pairs = [(p, n) for p in scores[labels == 1] for n in scores[labels == 0]]
    hand = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert auc(labels, scores) == pytest.approx(hand)
    assert auc(np.array([1, 1]), np.array([0.1, 0.2])) is None


def test_vintage_performance_by_request_month() -> None:
    days = [
        date(2026, 6, 3),
        date(2026, 6, 20),
        date(2026, 6, 30),
        date(2026, 7, 1),
        date(2026, 7, 9),
    ]
    vintages = vintage_performance(
        days, [1, 0, 0, 1, 1], [0.9, 0.2, 0.3, 0.5, 0.6], cutoff=date(2026, 6, 30)
    )
    june, july = vintages
    assert (june.request_month, june.rows, june.defaults) == (date(2026, 6, 1), 3, 1)
    assert june.default_rate == pytest.approx(1 / 3) and june.auc == 1.0 and june.in_sample
    assert july.auc is None and july.default_rate == 1.0 and not july.in_sample


def test_log_drift_to_mlflow_logs_metrics_and_artifact(tmp_path: Path) -> None:
    import mlflow

    from registry.testing import empty_mlflow_db  # a migrated template copy: no 10 s migration

    mlflow.set_tracking_uri(empty_mlflow_db(tmp_path / "mlflow.db"))
    try:
        experiment = mlflow.create_experiment(
            "drift", artifact_location=(tmp_path / "art").as_uri()
        )
        reference = pa.table({"x": [1.0, 2.0, 3.0, 4.0, None]})
        current = pa.table({"x": [1.0, 1.0, 1.0, 5.0]})
        with pytest.raises(RuntimeError, match="active MLflow run"):
            log_drift_to_mlflow(reference, current)
        with mlflow.start_run(experiment_id=experiment) as run:
            report = log_drift_to_mlflow(
                reference, current, reference_scores=[0.1, 0.2], current_scores=[0.3]
            )
        logged = mlflow.get_run(run.info.run_id).data.metrics
        assert logged["psi.x"] == pytest.approx(report.feature_psi["x"])
        assert logged["psi.max"] == pytest.approx(report.feature_psi["x"])
        assert "psi.score" in logged
        artifact = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/drift/psi.json")
        assert json.loads(report.to_json()) == artifact
    finally:
        mlflow.set_tracking_uri("")


def test_infinities_get_bins_of_their_own_and_never_blind_the_quantiles() -> None:
    """DuckDB's DOUBLE arithmetic gives inf/-inf (x / 0.0, ln(0)). The reference's quantiles took
    them in (inf - inf is NaN, so edges became NaN) and every value fell in one bin: a reference
    of infinities read PSI 0 against any current sample, a drift from finite to infinite values
    was hidden. Infinities are now counted in a -inf and a +inf bin, beside the NULL bin."""
    rng = np.random.default_rng(3)
    finite = rng.normal(size=1000)
    inf = np.full(1000, np.inf)
    assert psi(inf, finite) > 0.25  # was 0.0
    assert psi(finite, inf) > 0.25
    assert psi(-inf, inf) > 0.25
    # a fifth of the values infinite on both sides: the same distribution, PSI 0
    mixed = np.concatenate([finite, np.full(250, np.inf), np.full(50, -np.inf)])
    assert np.all(np.isfinite(quantile_edges(mixed, 10)))
    assert psi(mixed, mixed.copy()) == pytest.approx(0.0, abs=1e-12)
    # the infinite share doubling is drift the bins see
    doubled = np.concatenate([finite[:700], np.full(600, np.inf)])
    shares = bin_shares(doubled, quantile_edges(mixed, 10))
    assert shares[-2] == pytest.approx(600 / 1300)  # the +inf bin, before the NULL bin
    assert psi(mixed, doubled) > 0.1
