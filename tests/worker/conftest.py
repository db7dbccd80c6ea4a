"""Worker fixtures: a queue database with online features, a tiny real LightGBM model, a model store."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

USER_FEATURES = ("card_spend_30d_jpy", "topup_count_90d", "late_ratio_180d")
FEATURE_NAMES = ["request_amount_jpy", "request_fee_jpy", *USER_FEATURES]
N_USERS = 40


def train_booster(seed: int) -> Any:
    """A small binary LightGBM model on synthetic rows with the project's feature layout."""
    import lightgbm as lgb

    rng = np.random.default_rng(seed)
    n = 2_000
    amount = rng.integers(1_000, 100_000, n).astype(float)
    x = np.column_stack(
        [
            amount,
            np.where(amount <= 5_000, 200.0, 800.0),
            rng.gamma(2.0, 20_000.0, n),
            rng.poisson(3, n).astype(float),
            rng.beta(1, 6, n),
        ]
    )
    logit = -2.0 + amount / 50_000 + 4 * x[:, 4] - 0.2 * x[:, 3]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    data = lgb.Dataset(x, y, feature_name=FEATURE_NAMES)
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "seed": seed}
    return lgb.train(params, data, num_boost_round=15)


@pytest.fixture(scope="session")
def booster() -> Any:
    """The 'production' test model (registry version 7)."""
    return train_booster(7)


@pytest.fixture(scope="session")
def staging_booster() -> Any:
    """A second model standing in for the Staging candidate (version 8)."""
    return train_booster(8)


def make_scorer(booster: Any, version: str) -> Any:
    """The serving Scorer around a booster."""
    from bentos.scoring import Scorer

    return Scorer(booster, model_version=version, feature_names=FEATURE_NAMES, cutoff=0.5)


@pytest.fixture
def queue_db(pg_url: str) -> str:
    """pg_url with the worker schema and a user_features_latest of N_USERS users (ids 1..N_USERS)."""
    from worker.queue import connect, ensure_schema

    with connect(pg_url) as conn:
        ensure_schema(conn)
        conn.execute(
            """CREATE TABLE user_features_latest (
                   user_id bigint PRIMARY KEY, as_of date NOT NULL,
                   card_spend_30d_jpy double precision, topup_count_90d bigint,
                   late_ratio_180d double precision, updated_at timestamptz NOT NULL)"""
        )
        rng = np.random.default_rng(1)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO user_features_latest VALUES (%s, '2026-11-26', %s, %s, %s, now())",
                [
                    (
                        u,
                        float(rng.gamma(2.0, 20_000.0)),
                        int(rng.poisson(3)),
                        None if u % 7 == 0 else float(rng.beta(1, 6)),
                    )
                    for u in range(1, N_USERS + 1)
                ],
            )
    return pg_url


def enqueue_many(url: str, n: int, amount: int = 30_000) -> list[int]:
    """Enqueue n valid jobs for users 1..N_USERS in one statement; returns their ids."""
    from worker.queue import connect

    with connect(url) as conn:
        rows = conn.execute(
            """INSERT INTO scoring_jobs (user_id, payload)
               SELECT 1 + (g %% %s), jsonb_build_object('amount_jpy', %s::bigint + g)
               FROM generate_series(1, %s) AS g RETURNING id""",
            (N_USERS, amount, n),
        ).fetchall()
    return [r[0] for r in rows]


_CONNECTIONS: dict[str, Any] = {}


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Rows of one statement, on one reused connection per database (tests poll a lot)."""
    from worker.queue import connect

    conn = _CONNECTIONS.get(url)
    if conn is None or conn.closed:
        conn = _CONNECTIONS[url] = connect(url)
    return conn.execute(sql, params).fetchall()


@pytest.fixture(autouse=True)
def _close_query_connections() -> Iterator[None]:
    """Close the polling connections before pg_url drops its database."""
    yield
    while _CONNECTIONS:
        _CONNECTIONS.popitem()[1].close()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` until true; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@contextmanager
def running(worker: Any) -> Iterator[Any]:
    """Run a Worker's loops in a background thread; stop and join on exit."""
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "worker did not stop within 30 s"


_SAVE_MODEL = """
import json, sys
import bentoml, lightgbm
booster = lightgbm.Booster(model_file=sys.argv[1])
meta = {"registry_version": "7", "feature_names": json.loads(sys.argv[2]), "cutoff": 0.5}
bentoml.lightgbm.save_model("paylater-default:7", booster, metadata=meta)
"""


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory, booster: Any) -> Path:
    """A BentoML home holding paylater-default:7, as `paylater bento import` would have left it."""
    import json
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("store")
    model_file = root / "booster.txt"
    booster.save_model(str(model_file))
    home = root / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    # A child process, so this test session's own BentoML configuration is left alone.
    subprocess.run(
        [sys.executable, "-c", _SAVE_MODEL, str(model_file), json.dumps(FEATURE_NAMES)],
        env=env,
        check=True,
        timeout=120,
    )
    return home


@pytest.fixture(scope="session")
def kit() -> Any:
    """The helpers above for test modules (importlib mode cannot import conftest by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        query=query,
        enqueue_many=enqueue_many,
        wait_until=wait_until,
        running=running,
        make_scorer=make_scorer,
        feature_names=FEATURE_NAMES,
        n_users=N_USERS,
    )
