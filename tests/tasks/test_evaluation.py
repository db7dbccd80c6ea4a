"""Evaluation metrics against hand-computed values; plots and oracle lookup."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.evaluation import (
    calibration_table,
    classification_metrics,
    evaluate_candidate,
    expected_calibration_error,
    ks_statistic,
    oracle_probabilities,
    population_stability_index,
    write_plots,
)


def test_ece_uses_equal_mass_bins() -> None:
    probs = np.array([0.1] * 5 + [0.3] * 5)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0, 0])  # 1/5 then 2/5 default
    mean_pred, observed, share = calibration_table(labels, probs, bins=2)
    assert mean_pred.tolist() == pytest.approx([0.1, 0.3])
    assert observed.tolist() == pytest.approx([0.2, 0.4])
    assert share.tolist() == [0.5, 0.5]
    assert expected_calibration_error(labels, probs, bins=2) == pytest.approx(0.1)


def test_ece_of_true_probabilities_shrinks_with_rows() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.3, 400_000)
    y = (rng.random(len(p)) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.003
    assert expected_calibration_error(y, np.clip(p * 1.5, 0, 1)) > 0.05


def test_ks_and_psi() -> None:
    assert ks_statistic([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(1.0)
    assert ks_statistic([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    a = rng.normal(size=50_000)
    assert population_stability_index(a, a) == pytest.approx(0.0, abs=1e-12)
    assert population_stability_index(a, rng.normal(size=50_000)) < 0.01
    assert population_stability_index(a, rng.normal(0.5, 1, 50_000)) > 0.2


def test_classification_metrics_and_one_class_error() -> None:
    m = classification_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert m["auc"] == pytest.approx(0.75)
    assert m["brier"] == pytest.approx(np.mean([0.01, 0.16, 0.4225, 0.04]))
    assert set(m) >= {"auc", "pr_auc", "ks", "log_loss", "brier", "ece"}
    with pytest.raises(ValueError, match="both defaulted and repaid"):
        classification_metrics([0, 0], [0.1, 0.2])


def test_oracle_probabilities_follow_charge_ids(tmp_path: Path) -> None:
    path = tmp_path / "truth.parquet"
    pq.write_table(pa.table({"charge_id": [5, 3, 9], "default_probability": [0.5, 0.3, 0.9]}), path)
    oracle = oracle_probabilities(np.array([9, 4, 3]), path)
    assert oracle is not None, "the truth file exists"
    probs, found = oracle
    assert found.tolist() == [True, False, True]
    assert probs[found].tolist() == [0.9, 0.3]
    assert oracle_probabilities([1], tmp_path / "absent.parquet") is None
    rng = np.random.default_rng(2)
    ids = np.array([5, 3, 9] * 50)
    y = (rng.random(len(ids)) < 0.5).astype(int)
    evaluation = evaluate_candidate(y, rng.random(len(ids)), ids, path)
    assert set(evaluation.all_metrics()) >= {"auc", "oracle_auc", "oracle_ece", "oracle_auc_gap"}


def test_plots_are_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.2).astype(int)
    paths = write_plots(y, rng.random(500), ["a", "b"], [3.0, 1.0], tmp_path / "plots", "OOT")
    assert [p.name for p in paths] == [
        "roc.png",
        "calibration.png",
        "feature_importance.png",
        "score_distribution.png",
    ]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_ece_keeps_tied_scores_in_one_bin() -> None:
    # A model with few distinct scores (a shallow or early-stopped booster) ties many rows: equal-mass
    # bins must not cut a tie by row order, or the ECE the gate reads depends on how rows are sorted.
    probs = np.full(1_000, 0.2)
    labels = np.array([1] * 200 + [0] * 800)  # exactly 20 % default: perfectly calibrated
    assert expected_calibration_error(labels, probs) == pytest.approx(0.0)
    assert expected_calibration_error(labels[::-1], probs) == pytest.approx(0.0)
    mean_pred, observed, share = calibration_table(labels, probs)
    assert mean_pred[share > 0].tolist() == pytest.approx([0.2])
    assert observed[share > 0].tolist() == pytest.approx([0.2])
    assert share.sum() == pytest.approx(1.0) and np.count_nonzero(share) == 1
    two = np.array([0.1] * 700 + [0.4] * 300)  # ties straddling the equal-mass cut points
    y = np.array([1] * 70 + [0] * 630 + [1] * 120 + [0] * 180)
    rng = np.random.default_rng(4)
    shuffled = rng.permutation(len(two))
    assert expected_calibration_error(y, two) == pytest.approx(0.0)
    assert expected_calibration_error(y[shuffled], two[shuffled]) == pytest.approx(0.0)


def test_truth_covering_only_repaid_charges_does_not_fail_the_evaluation(tmp_path: Path) -> None:
    """The oracle's figures are a diagnostic of synthetic data: a truth file covering a few OOT
    charges (from another generator run), all repaid, failed the whole retrain over them."""
    rng = np.random.default_rng(4)
    ids = np.arange(1, 1001)
    y = (rng.random(len(ids)) < 0.2).astype(int)
    p = np.clip(0.2 + 0.3 * (y - 0.2) + rng.normal(0, 0.1, len(ids)), 0.01, 0.99)
    repaid = ids[y == 0][:5]
    path = tmp_path / "truth.parquet"
    pq.write_table(pa.table({"charge_id": repaid, "default_probability": [0.1] * 5}), path)

    evaluation = evaluate_candidate(y, p, ids, path)
    assert evaluation.metrics == classification_metrics(y, p)
    assert evaluation.oracle == {"rows_share": 0.005}, "nothing to compare on one class"
