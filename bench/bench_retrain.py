"""Retrain benchmark: the whole monthly_retrain flow beside a bare lightgbm.train on the same arrays.

Both train on the same matured rows with the same params, early-stopping set and rounds, so the
difference is the flow's overhead: loading and checking the dataset, splitting, evaluation, plots,
MLflow logging, registration, gates and staging (and Prefect's task bookkeeping).

Untimed setup, as a deployed system has it already: the synthetic 1M-row dataset and its truth file
(or, with PAYLATER_BENCH_RETRAIN_DATASETS=<dataset URL>, an existing one, e.g. datagen's), a migrated
MLflow store (schema migrations run once per installation), a running Prefect API (a warm-up flow).
Environment: PAYLATER_BENCH_RETRAIN_ROWS (default 1,000,000), PAYLATER_BENCH_RETRAIN_MONTHS (7).
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any


def _setup(home: Path, rows: int, months: int) -> date | None:
    """Fill PAYLATER_HOME with a dataset (unless one is configured), truth and an empty MLflow store."""
    from registry.testing import (
        as_of_after,
        empty_mlflow_db,
        synthetic_training_table,
        write_dataset,
        write_truth,
    )

    os.environ["PAYLATER_HOME"] = str(home)
    os.environ["PAYLATER_REGISTRY_BUILD_BENTO"] = "false"  # serving's own benchmark times bentos
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("PAYLATER_MLFLOW_TRACKING_URI", None)
    empty_mlflow_db(home / "mlflow.db")
    existing = os.environ.get("PAYLATER_BENCH_RETRAIN_DATASETS")
    if existing:
        os.environ["PAYLATER_DATASET_URL"] = existing
        return None
    os.environ.pop("PAYLATER_DATASET_URL", None)
    first = date(2025, 1, 1)
    table, truth = synthetic_training_table(rows, first, months, seed=2026)
    as_of = as_of_after(first, months)
    write_dataset(table, as_of)
    write_truth(table, truth, home)
    return as_of


def _bare_train(as_of: date | None) -> tuple[float, int]:
    """lightgbm.train alone on the arrays the flow trains on: (seconds, trees)."""
    import lightgbm as lgb

    from paylater.settings import get_settings
    from tasks.datasets import load_training_dataset
    from tasks.training import DatasetRef, TrainingParams, split_out_of_time

    params = TrainingParams.from_settings(get_settings())
    table, manifest = load_training_dataset(as_of)
    dataset = DatasetRef.from_manifest(manifest)
    split = split_out_of_time(
        table, dataset.model_features(), dataset.as_of, params.early_stopping_share
    )
    lgb_params = params.lightgbm_params()
    started = time.perf_counter()
    fit = lgb.Dataset(
        split.x_fit, label=split.y_fit, feature_name=split.feature_names, params=lgb_params
    )
    stop = lgb.Dataset(split.x_stop, label=split.y_stop, reference=fit)
    booster = lgb.train(
        lgb_params,
        fit,
        num_boost_round=params.num_boost_round,
        valid_sets=[stop],
        callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)],
    )
    return time.perf_counter() - started, booster.best_iteration


def _task_times(flow_run_id: Any) -> dict[str, float]:
    """Seconds per task of one flow run, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    times: dict[str, float] = {}
    for run in runs:
        if run.start_time and run.end_time:
            name = run.name.rsplit("-", 1)[0]
            times[name] = times.get(name, 0.0) + (run.end_time - run.start_time).total_seconds()
    return times


def main() -> None:
    """Run both, print times, the overhead ratio and model quality against the oracle."""
    from prefect import flow

    rows = int(os.environ.get("PAYLATER_BENCH_RETRAIN_ROWS", "1000000"))
    months = int(os.environ.get("PAYLATER_BENCH_RETRAIN_MONTHS", "7"))
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as scratch:
        as_of = _setup(Path(scratch), rows, months)

        @flow(name="bench-warm-up")
        def warm_up() -> None:
            """Start the Prefect API before timing (a deployed system has one running)."""

        warm_up()
        from flows.monthly_retrain import monthly_retrain

        bare_seconds, trees = _bare_train(as_of)
        started = time.perf_counter()
        state = monthly_retrain(as_of=as_of, issue="bench", return_state=True)
        flow_seconds = time.perf_counter() - started
        report = state.result()
        steps = _task_times(state.state_details.flow_run_id)

    overhead = flow_seconds - bare_seconds
    source = os.environ.get("PAYLATER_BENCH_RETRAIN_DATASETS") or f"synthetic, {rows:,} rows"
    print(f"dataset: {source}; OOT month {report.oot_month}; {trees} trees")
    print(f"bare lightgbm.train        {bare_seconds:8.1f} s")
    print(
        f"monthly_retrain flow       {flow_seconds:8.1f} s  (status {report.status}, v{report.version})"
    )
    for name, seconds in sorted(steps.items(), key=lambda kv: -kv[1]):
        print(f"  task {name:22}{seconds:8.1f} s")
    print(
        f"overhead                   {overhead:8.1f} s = {overhead / bare_seconds:.1%} of training (goal <= 20%)"
    )
    m = report.metrics
    if "oracle_auc" in m:
        print(
            f"quality: OOT AUC {m['auc']:.4f} vs oracle {m['oracle_auc']:.4f} (gap {m['oracle_auc_gap']:+.4f}, "
            f"goal <= 0.01); ECE {m['ece']:.4f} (oracle's own {m['oracle_ece']:.4f}, goal <= 0.01)"
        )
    else:
        print(f"quality: OOT AUC {m['auc']:.4f}; ECE {m['ece']:.4f} (no truth file: no oracle)")
