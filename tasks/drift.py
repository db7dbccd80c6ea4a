"""Distribution drift (PSI) and vintage performance; plain functions, no Prefect.

PSI (population stability index) of a feature or score, current sample against a reference:
- bins: the reference's deciles (quantiles 0.1 … 0.9 of its finite values, duplicates dropped,
  so a feature with heavy ties gets fewer bins); intervals are right-closed, (e[i-1], e[i]], the
  first and last open-ended, so current values outside the reference range still land in a bin;
- -inf and +inf (DuckDB's x / 0.0, ln(0)) form a bin each, and NULLs (and NaN) another, so a jump
  in missing or infinite values shows up as drift;
- PSI = sum over bins of (c - r) * ln(c / r), with r, c the shares of each sample per bin;
- a bin empty in one sample gets the share EPSILON = 1e-4 instead of 0 (no renormalisation:
  the shift it adds is negligible), which keeps PSI finite; a bin empty in both adds 0.
Usual reading: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 significant shift.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DEFAULT_BINS = 10
EPSILON = 1e-4
# Fewer values than this on either side and sampling noise alone crosses the alert levels: PSI
# of two samples of one distribution is about (bins - 1) / n, and each bin left empty by chance
# adds about 0.7 (the epsilon's log). With 10 bins, 30 values give PSI > 0.25 most of the time;
# from 300 on, it stays under 0.1. Drift of smaller samples is reported but not judged.
MIN_JUDGED_ROWS = 300
NON_FEATURE_COLUMNS = frozenset(
    {"charge_id", "user_id", "requested_at", "request_date", "label_default", "as_of"}
)


def quantile_edges(reference: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Interior cut points: the reference's 1/bins … (bins-1)/bins quantiles of its finite values
    (an infinity would make them NaN: inf - inf), deduplicated."""
    if bins < 2:
        raise ValueError(f"PSI needs at least 2 bins, got {bins}")
    values = reference[np.isfinite(reference)]
    if values.size == 0:
        return np.empty(0)
    return np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1]))


def bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of `values` per bin: len(edges)+1 right-closed finite bins, then -inf, +inf, NULL."""
    finite = np.isfinite(values)
    index = np.searchsorted(edges, values[finite], side="left")
    counts = np.append(
        np.bincount(index, minlength=edges.size + 1),
        [np.sum(values == -np.inf), np.sum(values == np.inf), np.isnan(values).sum()],
    )
    return counts / max(values.size, 1)


def psi_from_shares(reference: np.ndarray, current: np.ndarray, epsilon: float = EPSILON) -> float:
    """sum((c - r) * ln(c / r)) with empty shares replaced by `epsilon`."""
    r = np.where(reference > 0, reference, epsilon)
    c = np.where(current > 0, current, epsilon)
    return float(np.sum((c - r) * np.log(c / r)))


def psi(
    reference: Sequence[float | None] | np.ndarray,
    current: Sequence[float | None] | np.ndarray,
    bins: int = DEFAULT_BINS,
    epsilon: float = EPSILON,
) -> float:
    """PSI of `current` against `reference` (quantile bins of the reference, NULL bin, epsilon)."""
    ref = as_float_array(reference)
    cur = as_float_array(current)
    if ref.size == 0 or cur.size == 0:
        raise ValueError(
            f"PSI needs values on both sides, got {ref.size} reference and {cur.size} current"
        )
    edges = quantile_edges(ref, bins)
    return psi_from_shares(bin_shares(ref, edges), bin_shares(cur, edges), epsilon)


def as_float_array(values: Any) -> np.ndarray:
    """A float64 numpy array with NaN for NULL, from a list, numpy array or Arrow array."""
    if isinstance(values, pa.ChunkedArray | pa.Array):
        return np.asarray(pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False), dtype=float)
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def numeric_features(reference: pa.Table, current: pa.Table) -> list[str]:
    """Numeric columns both tables share, in reference order, minus ids, dates and labels."""
    shared = set(current.column_names)
    return [
        f.name
        for f in reference.schema
        if f.name in shared
        and f.name not in NON_FEATURE_COLUMNS
        and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
    ]


@dataclass
class DriftReport:
    """PSI of each feature (and of the score when given) of a current sample against a reference."""

    feature_psi: dict[str, float]
    score_psi: float | None
    reference_rows: int
    current_rows: int
    bins: int = DEFAULT_BINS
    epsilon: float = EPSILON
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def max_feature_psi(self) -> float | None:
        """The largest feature PSI (None without features)."""
        return max(self.feature_psi.values(), default=None)

    def to_json(self) -> str:
        """The report as JSON."""
        return json.dumps(asdict(self), indent=1, sort_keys=True)


def drift_report(
    reference: pa.Table,
    current: pa.Table,
    features: Iterable[str] | None = None,
    reference_scores: Sequence[float] | np.ndarray | None = None,
    current_scores: Sequence[float] | np.ndarray | None = None,
    bins: int = DEFAULT_BINS,
) -> DriftReport:
    """Per-feature PSI of `current` against `reference`, and score PSI when both scores are given."""
    names = list(features) if features is not None else numeric_features(reference, current)
    missing = [n for n in names if n not in reference.column_names or n not in current.column_names]
    if missing:
        raise ValueError(f"features missing from the reference or current table: {missing}")
    feature_psi: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            feature_psi[name] = psi(reference.column(name), current.column(name), bins)
        except ValueError as exc:
            skipped[name] = str(exc)
    score_psi = None
    if reference_scores is not None and current_scores is not None:
        try:
            score_psi = psi(reference_scores, current_scores, bins)
        except ValueError as exc:
            skipped["score"] = str(exc)
    return DriftReport(
        feature_psi, score_psi, reference.num_rows, current.num_rows, bins, EPSILON, skipped
    )


def log_drift_to_mlflow(
    reference: pa.Table,
    current: pa.Table,
    features: Iterable[str] | None = None,
    reference_scores: Sequence[float] | np.ndarray | None = None,
    current_scores: Sequence[float] | np.ndarray | None = None,
    run_id: str | None = None,
) -> DriftReport:
    """Compute drift and log it to MLflow: metrics psi.<feature>, psi.max, psi.score; drift/psi.json.

    Logs to `run_id`, else to the active run (one must be active: no run is started silently).
    """
    import mlflow

    report = drift_report(reference, current, features, reference_scores, current_scores)
    metrics = {f"psi.{name}": value for name, value in report.feature_psi.items()}
    if report.max_feature_psi is not None:
        metrics["psi.max"] = report.max_feature_psi
    if report.score_psi is not None:
        metrics["psi.score"] = report.score_psi
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_drift_to_mlflow needs run_id or an active MLflow run")
        run_id = active.info.run_id
    client = mlflow.MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_dict(run_id, json.loads(report.to_json()), "drift/psi.json")
    return report


def drift_rows(report: DriftReport, as_of: date) -> pa.Table:
    """One warehouse row per feature (and `__score__` for the score) for the monitoring_drift table."""
    items = [*report.feature_psi.items()]
    if report.score_psi is not None:
        items.append(("__score__", report.score_psi))
    return pa.table(
        {
            "as_of": pa.array([as_of] * len(items), pa.date32()),
            "feature": pa.array([name for name, _ in items], pa.string()),
            "psi": pa.array([value for _, value in items], pa.float64()),
            "reference_rows": pa.array([report.reference_rows] * len(items), pa.int64()),
            "current_rows": pa.array([report.current_rows] * len(items), pa.int64()),
        }
    )


# --- vintage performance ---------------------------------------------------------------------


@dataclass(frozen=True)
class Vintage:
    """Matured outcomes and scores of the charges requested in one month."""

    request_month: date
    rows: int
    defaults: int
    default_rate: float
    mean_score: float
    auc: float | None  # None when the month has only one outcome
    in_sample: bool  # requested on or before the model's training cutoff


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties at half; None with one class."""
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    rank_sum = ranks[labels == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def vintage_performance(
    request_dates: Sequence[date],
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    cutoff: date | None = None,
) -> list[Vintage]:
    """AUC, default rate and mean score by request month of matured, labelled requests."""
    y = np.asarray(labels, dtype=int)
    p = np.asarray(scores, dtype=float)
    if not (len(request_dates) == y.size == p.size):
        raise ValueError("request_dates, labels and scores must have the same length")
    months = np.array([d.replace(day=1) for d in request_dates], dtype="datetime64[D]")
    out = []
    for month in np.unique(months):
        mask = months == month
        first_day = month.astype(object)
        out.append(
            Vintage(
                request_month=first_day,
                rows=int(mask.sum()),
                defaults=int(y[mask].sum()),
                default_rate=float(y[mask].mean()),
                mean_score=float(p[mask].mean()),
                auc=auc(y[mask], p[mask]),
                in_sample=cutoff is not None and first_day <= cutoff,
            )
        )
    return out


def vintage_rows(vintages: Sequence[Vintage], as_of: date, model_version: str) -> pa.Table:
    """Warehouse rows for the monitoring_vintage table."""
    return pa.table(
        {
            "as_of": pa.array([as_of] * len(vintages), pa.date32()),
            "model_version": pa.array([model_version] * len(vintages), pa.string()),
            "request_month": pa.array([v.request_month for v in vintages], pa.date32()),
            "charges": pa.array([v.rows for v in vintages], pa.int64()),
            "defaults": pa.array([v.defaults for v in vintages], pa.int64()),
            "default_rate": pa.array([v.default_rate for v in vintages], pa.float64()),
            "mean_score": pa.array([v.mean_score for v in vintages], pa.float64()),
            "auc": pa.array([v.auc for v in vintages], pa.float64()),
            "in_sample": pa.array([v.in_sample for v in vintages], pa.bool_()),
        }
    )


# --- loading (datasets, the production model, production scores) -----------------------------

_AS_OF_IN_URI = re.compile(r"as_of=(\d{4}-\d{2}-\d{2})")


@dataclass
class ProductionModel:
    """The production version's booster, its features and the dataset day it was trained on."""

    version: str
    booster: Any
    features: list[str]
    trained_as_of: date | None


def production_model() -> ProductionModel | None:
    """The version behind the `production` alias (None while there is none)."""
    from registry.policy import alias_version, get_version
    from registry.runs import load_booster, version_features
    from registry.store import client

    mlflow_client = client()
    version = alias_version(mlflow_client, "production")
    if version is None:
        return None
    tags = get_version(mlflow_client, version).tags or {}
    found = _AS_OF_IN_URI.search(tags.get("dataset_uri", ""))
    trained = date.fromisoformat(found.group(1)) if found else None
    return ProductionModel(version, load_booster(version), version_features(version), trained)


def model_scores(model: ProductionModel, table: pa.Table) -> np.ndarray:
    """The model's default probabilities for every row of a training-shaped table."""
    from tasks.training import feature_matrix, predict

    return predict(model.booster, feature_matrix(table, model.features))


def last_trained_month(request_dates: Sequence[date], trained_as_of: date | None) -> date | None:
    """The newest request month already matured when the model's training dataset was built."""
    from tasks.training import month_matured

    if trained_as_of is None:
        return None
    months = {d.replace(day=1) for d in request_dates}
    seen = [m for m in months if month_matured(m, trained_as_of)]
    return max(seen, default=None)


def production_vintages(training: pa.Table, as_of: date, model: ProductionModel) -> list[Vintage]:
    """Vintage performance of the production model on every charge matured by `as_of`.

    The features of a charge are those the service saw at request time (same point-in-time SQL),
    so the model's score here is the production score; months the model had already seen at
    training are flagged in_sample, later months are its true out-of-sample record.
    """
    from tasks.training import labels, matured_charges

    matured = matured_charges(training, as_of)
    if matured.num_rows == 0:
        return []
    days = matured.column("request_date").to_pylist()
    return vintage_performance(
        days,
        labels(matured),
        model_scores(model, matured),
        cutoff=last_trained_month(days, model.trained_as_of),
    )
