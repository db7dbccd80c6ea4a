"""Fixtures for serving tests: a tiny LightGBM model in a throwaway MLflow registry and online features."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

USER_FEATURES = ["days_since_signup", "topups_30d", "card_spend_30d_jpy", "late_repayments_365d"]
FEATURES = ["request_amount_jpy", "request_fee_jpy", *USER_FEATURES]
KNOWN_USERS: dict[int, dict[str, float | None]] = {
    1: {
        "days_since_signup": 400.0,
        "topups_30d": 6.0,
        "card_spend_30d_jpy": 52000.0,
        "late_repayments_365d": 0.0,
    },
    2: {
        "days_since_signup": 12.0,
        "topups_30d": 0.0,
        "card_spend_30d_jpy": 900.0,
        "late_repayments_365d": 3.0,
    },
    3: {
        "days_since_signup": 90.0,
        "topups_30d": None,
        "card_spend_30d_jpy": 15000.0,
        "late_repayments_365d": 1.0,
    },
}


def train_booster(seed: int = 7, rows: int = 600) -> Any:
    """A small binary LightGBM model on synthetic rows shaped like the real feature set."""
    import lightgbm as lgb
    import numpy as np

    from paylater.product import fee_for

    rng = np.random.default_rng(seed)
    amount = rng.integers(1_000, 100_001, rows)
    fee = np.array([fee_for(int(a)) for a in amount])
    days = rng.integers(1, 1500, rows)
    topups = rng.poisson(4, rows)
    spend = rng.gamma(2.0, 20000.0, rows)
    late = rng.poisson(0.5, rows)
    logit = -2 + amount / 40000 - days / 600 + late * 0.9 - topups * 0.1
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    x = np.column_stack([amount, fee, days, topups, spend, late]).astype(float)
    data = lgb.Dataset(x, label, feature_name=FEATURES)
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "seed": seed}
    return lgb.train(params, data, num_boost_round=20)


def register(booster: Any, cutoff: float = 0.4, alias: str | None = None) -> str:
    """Log and register `booster` as paylater-default with the contract's tags; set `alias`."""
    import mlflow
    import mlflow.lightgbm
    from mlflow import MlflowClient

    with mlflow.start_run() as run:
        mlflow.set_tags({"git_commit": "abc123", "dataset_digest": "sha256:feed", "issue": "5"})
        info = mlflow.lightgbm.log_model(
            booster,
            name="model",
            pip_requirements=["lightgbm"],
            registered_model_name="paylater-default",
        )
    client = MlflowClient()
    version = str(info.registered_model_version)
    tags = {
        "dataset_digest": "sha256:feed",
        "dataset_uri": "file:///tmp/ds",
        "feature_sql_hash": "sqlhash1",
        "git_commit": "abc123",
        "issue": "5",
        "feature_names": json.dumps(FEATURES),
        "cutoff": str(cutoff),
    }
    for key, value in tags.items():
        client.set_model_version_tag("paylater-default", version, key, value)
    if alias:
        client.set_registered_model_alias("paylater-default", alias, version)
    assert run.info.run_id
    return version


@pytest.fixture(scope="session")
def registry_template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An MLflow sqlite registry holding versions 1 (production) and 2 (staging), built once.

    Creating an MLflow database runs its migrations (~10 s): the store starts as a copy of the
    session's migrated template, and modules copy this file in turn.
    Artifacts live beside it (never in the working directory's ./mlruns).
    """
    import mlflow

    from registry.testing import empty_mlflow_db

    root = tmp_path_factory.mktemp("registry")
    uri = empty_mlflow_db(root / "mlflow.db")
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.create_experiment(
            "serving-tests", artifact_location=(root / "artifacts").as_uri()
        )
        mlflow.set_experiment(experiment_id=experiment)
        production = register(train_booster(seed=7), alias="production")
        staging = register(train_booster(seed=8), alias="staging")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    return {
        "db": str(root / "mlflow.db"),
        "production_version": production,
        "staging_version": staging,
    }


@pytest.fixture(scope="module")
def serving_env(
    registry_template: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """This module's copy of the registry, and a BentoML home, both in tmp (env restored after)."""
    import shutil

    import mlflow

    root = tmp_path_factory.mktemp("serving")
    shutil.copy(registry_template["db"], root / "mlflow.db")
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "BENTOML_HOME": str(root / "bentoml"),
        "PAYLATER_HOME": str(root / "home"),
    }
    saved = {k: os.environ.get(k) for k in env}
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    os.environ.update(env)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(env["MLFLOW_TRACKING_URI"])
    _reset_bentoml_home(Path(env["BENTOML_HOME"]))
    try:
        yield env | {k: registry_template[k] for k in ("production_version", "staging_version")}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        _reset_bentoml_home(None)


def _reset_bentoml_home(home: Path | None) -> None:
    """Point this process's BentoML model and bento stores at `home` (None: back to the default)."""
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    base = home or Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    for sub in ("models", "bentos", "tmp", "envs"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    BentoMLContainer.bentoml_home.set(str(base))
    BentoMLContainer.model_store.set(ModelStore(str(base / "models")))
    BentoMLContainer.bento_store.set(BentoStore(str(base / "bentos")))


def create_online_features(
    pg_url: str, users: dict[int, dict[str, float | None]] | None = None
) -> None:
    """Create and fill user_features_latest as the feature publisher would."""
    import psycopg

    users = KNOWN_USERS if users is None else users
    cols = ", ".join(f"{c} double precision" for c in USER_FEATURES)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE user_features_latest (user_id bigint PRIMARY KEY, as_of date NOT NULL, {cols}, updated_at timestamptz NOT NULL DEFAULT now())"
        )
        for user_id, feats in users.items():
            conn.execute(
                f"INSERT INTO user_features_latest (user_id, as_of, {', '.join(USER_FEATURES)}) VALUES (%s, '2026-11-26', {', '.join(['%s'] * len(USER_FEATURES))})",
                [user_id, *[feats[c] for c in USER_FEATURES]],
            )


@pytest.fixture
def online_features(pg_url: str) -> str:
    """A fresh database holding user_features_latest for KNOWN_USERS."""
    create_online_features(pg_url)
    return pg_url


@pytest.fixture(scope="session")
def catalog() -> SimpleNamespace:
    """The tiny model's feature names and the known users' online features."""
    return SimpleNamespace(features=FEATURES, user_features=USER_FEATURES, users=KNOWN_USERS)


@pytest.fixture(scope="session")
def fill_online_features() -> Any:
    """create_online_features, for module-scoped fixtures that make their own database."""
    return create_online_features
