"""Training: matured charges, an out-of-time validation month, a deterministic LightGBM booster."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from paylater.product import GRACE_DAYS, due_date_for

if TYPE_CHECKING:
    import lightgbm as lgb

    from paylater.settings import Settings

REQUEST_FEATURES = ("request_amount_jpy", "request_fee_jpy")
"""The request's own fields, always the first two model features."""
LABEL = "label_default"
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class DatasetRef:
    """What the model records about its training dataset: where it is, its digest, its features."""

    uri: str
    digest: str
    sql_hash: str
    as_of: date
    features: tuple[str, ...]
    rows: int

    @classmethod
    def from_manifest(cls, manifest: Any) -> DatasetRef:
        """Read a dataset Manifest (object with attributes, or a mapping such as manifest.json)."""

        def field(name: str, default: Any = None) -> Any:
            if isinstance(manifest, Mapping):
                return manifest.get(name, default)
            return getattr(manifest, name, default)

        features = field("features")
        if not features:
            raise ValueError("the dataset manifest lists no features")
        as_of = field("as_of")
        return cls(
            uri=str(field("uri", "")),
            digest=str(field("sha256", "")),
            sql_hash=str(field("sql_hash", "")),
            as_of=as_of if isinstance(as_of, date) else date.fromisoformat(str(as_of)[:10]),
            features=tuple(str(f) for f in features),
            rows=int(field("rows", 0) or 0),
        )

    def model_features(self) -> list[str]:
        """The model's feature order: the request fields first, then the user features in manifest order."""
        user = [f for f in self.features if f not in REQUEST_FEATURES]
        return [*REQUEST_FEATURES, *user]


class TrainingParams(BaseModel):
    """Everything that, with the data, determines the booster; logged with every run."""

    learning_rate: float = Field(description="Shrinkage per boosting round.")
    num_leaves: int = Field(description="Leaves per tree.")
    min_data_in_leaf: int = Field(description="Smallest leaf.")
    feature_fraction: float = Field(description="Share of features tried per tree.")
    lambda_l2: float = Field(description="L2 regularisation of leaf values.")
    max_bin: int = Field(description="Histogram bins per feature.")
    num_boost_round: int = Field(description="Upper bound on rounds.")
    early_stopping_rounds: int = Field(description="Patience of early stopping.")
    early_stopping_share: int = Field(description="1 in N in-time charges form the stopping set.")
    num_threads: int = Field(description="LightGBM threads (results depend on it).")
    seed: int = Field(description="LightGBM seed.")

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainingParams:
        """The configured training parameters."""
        return cls(
            learning_rate=settings.train_learning_rate,
            num_leaves=settings.train_num_leaves,
            min_data_in_leaf=settings.train_min_data_in_leaf,
            feature_fraction=settings.train_feature_fraction,
            lambda_l2=settings.train_lambda_l2,
            max_bin=settings.train_max_bin,
            num_boost_round=settings.train_num_boost_round,
            early_stopping_rounds=settings.train_early_stopping_rounds,
            early_stopping_share=settings.train_early_stopping_share,
            num_threads=settings.train_num_threads,
            seed=settings.train_seed,
        )

    def lightgbm_params(self) -> dict[str, Any]:
        """Native lightgbm.train params; deterministic=True + fixed threads + col-wise give repeatable trees."""
        return {
            "objective": "binary",
            "metric": "binary_logloss",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "lambda_l2": self.lambda_l2,
            "max_bin": self.max_bin,
            "num_threads": self.num_threads,
            "seed": self.seed,
            "deterministic": True,
            "force_col_wise": True,
            "verbosity": -1,
        }


@dataclass
class TrainingSplit:
    """Feature matrices of the fitting rows, the early-stopping rows and the out-of-time month."""

    as_of: date
    feature_names: list[str]
    oot_month: date
    train_months: list[date]
    x_fit: FloatArray
    y_fit: npt.NDArray[np.int8]
    x_stop: FloatArray
    y_stop: npt.NDArray[np.int8]
    x_oot: FloatArray
    y_oot: npt.NDArray[np.int8]
    oot_rows: pa.Table
    """The OOT month's rows with every column, for golden requests and scoring older models."""


def month_starts(dates: pa.Array | pa.ChunkedArray) -> npt.NDArray[np.datetime64]:
    """The first day of each date's month, as numpy datetime64[M]."""
    days = np.asarray(
        pc.cast(dates, pa.date32()).to_numpy(zero_copy_only=False), dtype="datetime64[D]"
    )
    return days.astype("datetime64[M]")


def month_matured(month: date, as_of: date) -> bool:
    """Whether every charge requested in `month` is past due date + grace at the end of `as_of`."""
    return as_of >= due_date_for(month) + timedelta(days=GRACE_DAYS)


def matured_charges(table: pa.Table, as_of: date) -> pa.Table:
    """Rows whose label is known at `as_of`: label present and the request month fully matured."""
    labelled = table.filter(pc.is_valid(table[LABEL]))
    months = month_starts(labelled["request_date"])
    distinct = sorted({m.astype(date) for m in np.unique(months)})
    matured = [np.datetime64(m, "M") for m in distinct if month_matured(m, as_of)]
    return labelled.filter(pa.array(np.isin(months, matured)))


def feature_matrix(table: pa.Table, names: Sequence[str]) -> FloatArray:
    """A float64 C-ordered matrix of `names` (NULL becomes NaN, which LightGBM treats as missing)."""
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise ValueError(f"the dataset lacks model features: {', '.join(missing)}")
    matrix = np.empty((table.num_rows, len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        column = pc.cast(table[name], pa.float64())
        matrix[:, j] = column.to_numpy(zero_copy_only=False)
    return matrix


def labels(table: pa.Table) -> npt.NDArray[np.int8]:
    """The 0/1 default labels as int8."""
    return np.asarray(table[LABEL].to_numpy(zero_copy_only=False), dtype=np.int8)


def _refuse_duplicated_charges(table: pa.Table) -> None:
    """ValueError when a charge has more than one row (it would count twice in fitting and metrics)."""
    ids, counts = np.unique(table["charge_id"].to_numpy(zero_copy_only=False), return_counts=True)
    repeated = ids[counts > 1]
    if len(repeated):
        shown = ", ".join(str(i) for i in repeated[:10])
        raise ValueError(
            f"{len(repeated)} charges have more than one row in the dataset (charge_id {shown}"
            + (", ..." if len(repeated) > 10 else "")
            + "): one row per charge is expected; check the feature SQL joins"
        )


def split_out_of_time(
    table: pa.Table, feature_names: Sequence[str], as_of: date, early_stopping_share: int
) -> TrainingSplit:
    """Latest matured request month = OOT; earlier months fit the model, 1 in N of them stops it early."""
    if early_stopping_share < 2:
        # N=1 would leave nothing to fit; trained another way, the logged N would misstate it.
        raise ValueError(
            f"early_stopping_share must be at least 2, got {early_stopping_share}"
            " (1 in N in-time charges form the early-stopping set)"
        )
    matured = matured_charges(table, as_of)
    if matured.num_rows == 0:
        raise ValueError(f"no matured, labelled charges as of {as_of}")
    _refuse_duplicated_charges(matured)
    months = month_starts(matured["request_date"])
    distinct = np.unique(months)
    if len(distinct) < 2:
        raise ValueError(
            f"need at least two matured request months as of {as_of} (one to train, one out of time), "
            f"have {[str(m) for m in distinct]}"
        )
    oot_month = distinct[-1]
    is_oot = months == oot_month
    in_time = matured.filter(pa.array(~is_oot))
    oot = matured.filter(pa.array(is_oot))
    charge_ids = np.asarray(in_time["charge_id"].to_numpy(zero_copy_only=False))
    # Early stopping on a fixed in-time slice keeps the OOT month unseen by any fitting decision.
    is_stop = charge_ids % early_stopping_share == 0
    fit, stop = in_time.filter(pa.array(~is_stop)), in_time.filter(pa.array(is_stop))
    if stop.num_rows == 0 or fit.num_rows == 0:
        raise ValueError("too few in-time charges to hold out an early-stopping slice")
    return TrainingSplit(
        as_of=as_of,
        feature_names=list(feature_names),
        oot_month=oot_month.astype(date),
        train_months=[m.astype(date) for m in distinct[:-1]],
        x_fit=feature_matrix(fit, feature_names),
        y_fit=labels(fit),
        x_stop=feature_matrix(stop, feature_names),
        y_stop=labels(stop),
        x_oot=feature_matrix(oot, feature_names),
        y_oot=labels(oot),
        oot_rows=oot,
    )


def train_booster(split: TrainingSplit, params: TrainingParams) -> lgb.Booster:
    """lightgbm.train with early stopping on the in-time stopping slice; same inputs, same trees."""
    import lightgbm as lgb

    lgb_params = params.lightgbm_params()
    fit = lgb.Dataset(
        split.x_fit, label=split.y_fit, feature_name=split.feature_names, params=lgb_params
    )
    stop = lgb.Dataset(split.x_stop, label=split.y_stop, reference=fit)
    return lgb.train(
        lgb_params,
        fit,
        num_boost_round=params.num_boost_round,
        valid_sets=[stop],
        valid_names=["early_stopping"],
        callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)],
    )


def frozen(booster: lgb.Booster) -> lgb.Booster:
    """The booster as the registry will load it (text round trip), so stored predictions match serving."""
    import lightgbm as lgb

    return lgb.Booster(model_str=booster.model_to_string(num_iteration=booster.best_iteration))


def predict(booster: lgb.Booster, x: FloatArray, num_threads: int = 1) -> FloatArray:
    """Default probabilities for a feature matrix (each row's value is the same at any thread count)."""
    return np.asarray(booster.predict(x, num_threads=num_threads), dtype=np.float64)


def gain_importance(booster: lgb.Booster) -> FloatArray:
    """Total split gain per feature, in the booster's feature order."""
    return np.asarray(booster.feature_importance(importance_type="gain"), dtype=np.float64)


def golden_requests(
    booster: lgb.Booster, oot_rows: pa.Table, feature_names: Sequence[str], count: int
) -> list[dict[str, Any]]:
    """`count` OOT rows, evenly spread by charge id, as service requests with the model's own answers."""
    if oot_rows.num_rows == 0 or count <= 0:
        return []
    user_features = [n for n in feature_names if n not in REQUEST_FEATURES]
    ordered = oot_rows.sort_by("charge_id")
    # Rows without NULLs first: a JSON null is the one value a strict API might refuse.
    complete_mask = np.ones(ordered.num_rows, dtype=bool)
    for name in user_features:
        complete_mask &= pc.is_valid(ordered[name]).to_numpy(zero_copy_only=False)
    complete = ordered.filter(pa.array(complete_mask))
    pool = complete if complete.num_rows >= count else ordered
    picks = pool.take(
        np.unique(np.linspace(0, pool.num_rows - 1, min(count, pool.num_rows)).astype(int))
    )
    probs = predict(booster, feature_matrix(picks, feature_names))
    rows = picks.select([*REQUEST_FEATURES, *user_features]).to_pylist()
    return [
        {
            "request": {
                "amount_jpy": int(row["request_amount_jpy"]),
                "features": {n: _json_number(row[n]) for n in user_features},
            },
            "expected": {"default_probability": float(p)},
        }
        for row, p in zip(rows, probs, strict=True)
    ]


def _json_number(value: Any) -> float | int | None:
    """A feature value as JSON allows it: ints stay ints, NaN becomes null."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return None
    return value if isinstance(value, int) else float(value)


def params_json(params: TrainingParams) -> str:
    """The params as canonical JSON (logged as an artifact; reproduce reads it back)."""
    return json.dumps(params.model_dump(), sort_keys=True)
