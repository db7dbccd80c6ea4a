"""Training: maturity filter, out-of-time split, determinism, golden requests, manifest reading."""

from __future__ import annotations

from datetime import date
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from paylater.product import fee_for
from registry.testing import USER_FEATURES, as_of_after, synthetic_training_table
from tasks.training import (
    DatasetRef,
    TrainingParams,
    frozen,
    golden_requests,
    matured_charges,
    predict,
    split_out_of_time,
    train_booster,
)

FEATURES = ["request_amount_jpy", "request_fee_jpy", *USER_FEATURES]
PARAMS = TrainingParams(
    learning_rate=0.1,
    num_leaves=7,
    min_data_in_leaf=30,
    feature_fraction=0.8,
    lambda_l2=1.0,
    max_bin=63,
    num_boost_round=60,
    early_stopping_rounds=15,
    early_stopping_share=5,
    num_threads=2,
    seed=5,
)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    """Four request months of synthetic charges, January to April 2025."""
    return synthetic_training_table(6_000, date(2025, 1, 1), 4, seed=3)[0]


def test_only_matured_months_are_used_and_the_latest_is_out_of_time(table: pa.Table) -> None:
    # April's charges fall due 27 May, matured from 26 June; March's from 26 May.
    assert as_of_after(date(2025, 1, 1), 4) == date(2025, 6, 27)
    months = {
        d.replace(day=1)
        for d in matured_charges(table, date(2025, 6, 25))["request_date"].to_pylist()
    }
    assert months == {date(2025, 1, 1), date(2025, 2, 1), date(2025, 3, 1)}
    split = split_out_of_time(table, FEATURES, date(2025, 6, 26), 5)
    assert split.oot_month == date(2025, 4, 1)
    assert split.train_months == [date(2025, 1, 1), date(2025, 2, 1), date(2025, 3, 1)]
    oot_dates = split.oot_rows["request_date"].to_pylist()
    assert min(oot_dates) >= date(2025, 4, 1) and max(oot_dates) < date(2025, 5, 1)
    assert len(split.y_fit) + len(split.y_stop) + len(split.y_oot) == table.num_rows
    assert 0.1 < len(split.y_stop) / (len(split.y_fit) + len(split.y_stop)) < 0.3
    assert np.isnan(split.x_oot[:, FEATURES.index("balance_avg_30d_jpy")]).any(), (
        "NULL must become NaN"
    )


def test_split_refuses_too_few_months_and_missing_features(table: pa.Table) -> None:
    with pytest.raises(ValueError, match="at least two matured request months"):
        split_out_of_time(table, FEATURES, date(2025, 4, 1), 5)
    with pytest.raises(ValueError, match="lacks model features: nope"):
        split_out_of_time(table, [*FEATURES, "nope"], date(2025, 7, 1), 5)


def test_split_refuses_duplicated_charges(table: pa.Table) -> None:
    # One row per matured charge is the dataset's contract: a charge listed twice (a fanned-out join
    # upstream) would count twice in fitting and in the OOT metrics the gates read.
    duplicated = pa.concat_tables([table, table.slice(10, 3)])
    with pytest.raises(
        ValueError, match=r"3 charges have more than one row .*charge_id 11, 12, 13\)"
    ):
        split_out_of_time(duplicated, FEATURES, date(2025, 7, 1), 5)


def test_training_is_deterministic(table: pa.Table) -> None:
    split = split_out_of_time(table, FEATURES, date(2025, 7, 1), PARAMS.early_stopping_share)
    first, second = frozen(train_booster(split, PARAMS)), frozen(train_booster(split, PARAMS))
    assert first.model_to_string() == second.model_to_string()
    assert np.array_equal(predict(first, split.x_oot), predict(second, split.x_oot))
    other = frozen(
        train_booster(split, PARAMS.model_copy(update={"seed": 6, "feature_fraction": 0.5}))
    )
    assert not np.array_equal(predict(first, split.x_oot), predict(other, split.x_oot))


def test_golden_requests_are_service_requests_with_model_answers(table: pa.Table) -> None:
    split = split_out_of_time(table, FEATURES, date(2025, 7, 1), 5)
    booster = frozen(train_booster(split, PARAMS))
    golden = golden_requests(booster, split.oot_rows, FEATURES, 12)
    assert len(golden) == 12
    for case in golden:
        amount = case["request"]["amount_jpy"]
        features = case["request"]["features"]
        assert list(features) == list(USER_FEATURES) and None not in features.values()
        x = np.array([[amount, fee_for(amount), *features.values()]], dtype=float)
        assert predict(booster, x)[0] == case["expected"]["default_probability"]


def test_dataset_ref_reads_manifest_objects_and_mappings() -> None:
    body = {
        "as_of": "2025-07-01",
        "sha256": "ab" * 32,
        "sql_hash": "h",
        "features": ["txn_count_30d", "request_fee_jpy", "request_amount_jpy"],
        "uri": "file:///d/training/as_of=2025-07-01/part-0.parquet",
        "rows": 3,
    }
    from_dict = DatasetRef.from_manifest(body)
    from_object = DatasetRef.from_manifest(SimpleNamespace(**(body | {"as_of": date(2025, 7, 1)})))
    assert from_dict == from_object
    assert from_dict.model_features() == ["request_amount_jpy", "request_fee_jpy", "txn_count_30d"]
    with pytest.raises(ValueError, match="no features"):
        DatasetRef.from_manifest(body | {"features": []})


def test_an_early_stopping_share_below_two_is_refused_not_silently_changed(table: pa.Table) -> None:
    """N=1 (or 0) was trained as N=2 while the run logged 1: the logged params did not say how
    the model was trained."""
    for share in (0, 1):
        with pytest.raises(
            ValueError, match=f"early_stopping_share must be at least 2, got {share}"
        ):
            split_out_of_time(table, FEATURES, date(2025, 7, 1), share)
