"""Model evaluation on the out-of-time month: discrimination, calibration, score shift, and plots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FloatArray = npt.NDArray[np.float64]
CALIBRATION_BINS = 10
"""ECE and the calibration plot use this many equal-mass bins of the predicted probability."""
PSI_BINS = 10
_EPS = 1e-6


def ks_statistic(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Kolmogorov-Smirnov: the largest gap between the score CDFs of defaulters and payers."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.max(tpr - fpr))


def equal_mass_bins(scores: FloatArray, bins: int) -> npt.NDArray[np.intp]:
    """Bin index per row: rows sorted by score and cut into `bins` groups of (nearly) equal size.

    Equal scores share one bin (that of the first of them in score order): cutting a tie by row
    order would make the ECE depend on how the rows happen to be sorted. Bins may end up empty.
    """
    order = np.argsort(scores, kind="stable")
    ranked = np.asarray(scores)[order]
    by_rank = (np.arange(len(scores)) * bins) // max(len(scores), 1)
    index = np.empty(len(scores), dtype=np.intp)
    index[order] = by_rank[np.searchsorted(ranked, ranked, side="left")]
    return index


def calibration_table(
    labels: npt.ArrayLike, probs: npt.ArrayLike, bins: int = CALIBRATION_BINS
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(mean predicted, observed default rate, share of rows) per equal-mass bin."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    index = equal_mass_bins(p, bins)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    mean_pred = np.bincount(index, weights=p, minlength=bins) / safe
    observed = np.bincount(index, weights=y, minlength=bins) / safe
    return mean_pred, observed, counts / max(len(p), 1)


def expected_calibration_error(
    labels: npt.ArrayLike, probs: npt.ArrayLike, bins: int = CALIBRATION_BINS
) -> float:
    """ECE: sum over equal-mass bins of share x |mean predicted - observed rate|."""
    mean_pred, observed, share = calibration_table(labels, probs, bins)
    return float(np.sum(share * np.abs(mean_pred - observed)))


def population_stability_index(
    expected: npt.ArrayLike, actual: npt.ArrayLike, bins: int = PSI_BINS
) -> float:
    """PSI of `actual` against `expected`, on decile edges of `expected` (0.1 small, 0.25 large)."""
    ref = np.asarray(expected, dtype=np.float64)
    cur = np.asarray(actual, dtype=np.float64)
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_share = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1)
    cur_share = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1)
    ref_p = np.maximum(ref_share / max(len(ref), 1), _EPS)
    cur_p = np.maximum(cur_share / max(len(cur), 1), _EPS)
    return float(np.sum((cur_p - ref_p) * np.log(cur_p / ref_p)))


def classification_metrics(labels: npt.ArrayLike, probs: npt.ArrayLike) -> dict[str, float]:
    """AUC, PR-AUC, KS, log loss, Brier score and ECE of probabilities against 0/1 labels."""
    from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

    y = np.asarray(labels, dtype=np.int64)
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    if len(np.unique(y)) < 2:
        raise ValueError(
            "evaluation needs both defaulted and repaid charges in the out-of-time month"
        )
    return {
        "auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "ks": ks_statistic(y, p),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "brier": float(brier_score_loss(y, p)),
        "ece": expected_calibration_error(y, p),
        "default_rate": float(y.mean()),
        "mean_probability": float(p.mean()),
    }


def _figure(left: float = 0.15) -> tuple[Figure, Axes]:
    """A figure on the Agg canvas, no pyplot state (fixed margins: tight_layout costs more than the plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=80)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left, bottom=0.13, right=0.95, top=0.9)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    """Write a figure as PNG."""
    fig.savefig(path)
    return path


def plot_roc(labels: npt.ArrayLike, probs: npt.ArrayLike, path: Path, title: str) -> Path:
    """ROC curve with its AUC."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(labels, probs)
    fig, ax = _figure()
    ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(labels, probs):.4f}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_calibration(labels: npt.ArrayLike, probs: npt.ArrayLike, path: Path, title: str) -> Path:
    """Observed default rate against mean predicted probability per equal-mass bin."""
    mean_pred, observed, share = calibration_table(labels, probs)
    mean_pred, observed = mean_pred[share > 0], observed[share > 0]  # an empty bin is no point
    top = float(max(mean_pred.max(initial=0.0), observed.max(initial=0.0))) * 1.05 or 1.0
    fig, ax = _figure()
    ax.plot([0, top], [0, top], linestyle=":", color="grey")
    ax.plot(mean_pred, observed, marker="o")
    ax.set(
        xlabel="mean predicted probability",
        ylabel="observed default rate",
        title=f"{title} (ECE {expected_calibration_error(labels, probs):.4f})",
    )
    return _save(fig, path)


def plot_importance(
    names: Sequence[str], gains: npt.ArrayLike, path: Path, title: str, top: int = 20
) -> Path:
    """Total split gain per feature, largest first."""
    values = np.asarray(gains, dtype=np.float64)
    order = np.argsort(values)[::-1][:top][::-1]
    fig, ax = _figure(left=0.35)
    ax.barh([names[i] for i in order], values[order])
    ax.set(xlabel="total gain", title=title)
    return _save(fig, path)


def plot_score_distribution(
    labels: npt.ArrayLike, probs: npt.ArrayLike, path: Path, title: str
) -> Path:
    """Histogram of predicted probabilities for repaid and defaulted charges."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    edges = np.linspace(0.0, float(p.max(initial=0.0)) or 1.0, 41)
    fig, ax = _figure()
    for name, rows in (("repaid", p[y == 0]), ("defaulted", p[y == 1])):
        density, _ = np.histogram(rows, bins=edges, density=True)
        ax.stairs(density, edges, fill=True, alpha=0.5, label=name)
    ax.set(xlabel="predicted default probability", ylabel="density", title=title)
    ax.legend()
    return _save(fig, path)


def write_plots(
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    feature_names: Sequence[str],
    gains: npt.ArrayLike,
    folder: Path,
    label: str,
) -> list[Path]:
    """The four evaluation plots as PNG files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        plot_roc(labels, probs, folder / "roc.png", f"ROC, {label}"),
        plot_calibration(labels, probs, folder / "calibration.png", f"Calibration, {label}"),
        plot_importance(
            feature_names, gains, folder / "feature_importance.png", "Feature importance"
        ),
        plot_score_distribution(
            labels, probs, folder / "score_distribution.png", f"Scores, {label}"
        ),
    ]


def oracle_probabilities(
    charge_ids: npt.ArrayLike, truth_path: Path
) -> tuple[FloatArray, npt.NDArray[np.bool_]] | None:
    """The generator's true default probability per charge (and which charges it covers), if stored."""
    if not truth_path.is_file():
        return None
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    truth = pq.read_table(truth_path, columns=["charge_id", "default_probability"])
    position = pc.index_in(
        pa.array(np.asarray(charge_ids, dtype=np.int64)), value_set=truth["charge_id"]
    )
    found = np.asarray(pc.is_valid(position).to_numpy(zero_copy_only=False), dtype=bool)
    probs = np.full(len(found), np.nan)
    if found.any():
        taken = truth["default_probability"].take(pc.drop_null(position))
        probs[found] = np.asarray(taken.to_numpy(zero_copy_only=False), dtype=np.float64)
    return probs, found


@dataclass
class CandidateEvaluation:
    """A candidate's OOT probabilities and metrics, beside the true probabilities' when known."""

    probs: FloatArray
    metrics: dict[str, float]
    oracle: dict[str, float] = field(default_factory=dict)

    def all_metrics(self) -> dict[str, float]:
        """Metrics as logged to MLflow (oracle ones prefixed `oracle_`)."""
        return self.metrics | {f"oracle_{k}": v for k, v in self.oracle.items()}


def evaluate_candidate(
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    charge_ids: npt.ArrayLike,
    truth_path: Path | None,
) -> CandidateEvaluation:
    """Metrics of `probs` on the OOT rows; the oracle's on the same rows when truth is stored."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    evaluation = CandidateEvaluation(probs=p, metrics=classification_metrics(y, p))
    truth = oracle_probabilities(charge_ids, truth_path) if truth_path else None
    if truth is None or not truth[1].any():
        return evaluation
    true_p, found = truth
    if len(np.unique(y[found])) < 2:
        # A diagnostic only: the truth covers too few of these charges to compare on, and must
        # not fail the retrain (the candidate's own metrics need both classes, checked above).
        evaluation.oracle = {"rows_share": float(found.mean())}
        return evaluation
    oracle = classification_metrics(y[found], true_p[found])
    model_on_same = (
        evaluation.metrics if found.all() else classification_metrics(y[found], p[found])
    )
    evaluation.oracle = {
        "auc": oracle["auc"],
        "ece": oracle["ece"],
        "log_loss": oracle["log_loss"],
        "rows_share": float(found.mean()),
        "auc_gap": oracle["auc"] - model_on_same["auc"],
    }
    return evaluation
