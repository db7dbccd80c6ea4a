"""Registry fixtures: a trained good (once per session) and a deliberately worse candidate (once per
module), a fresh MLflow store (embedded SQLite, or a real `mlflow server` started once per session)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest

FIRST_MONTH = date(2025, 1, 1)
MONTHS = 4


@dataclass
class Candidate:
    """Everything monthly_retrain's register/gate tasks take, trained once."""

    table: Any
    dataset: Any
    params: Any
    split: Any
    booster: Any
    evaluation: Any


def _train(table: Any, url: str, truth_dir: Path | None, months: int = MONTHS) -> Candidate:
    """Store the dataset as of the end of `months` request months, split, train and evaluate as
    the flow does."""
    from registry.testing import as_of_after, write_dataset
    from tasks.evaluation import evaluate_candidate
    from tasks.training import (
        DatasetRef,
        TrainingParams,
        frozen,
        predict,
        split_out_of_time,
        train_booster,
    )

    as_of = as_of_after(FIRST_MONTH, months)
    dataset = DatasetRef.from_manifest(write_dataset(table, as_of, url))
    params = TrainingParams(
        learning_rate=0.1,
        num_leaves=7,
        min_data_in_leaf=40,
        feature_fraction=0.9,
        lambda_l2=1.0,
        max_bin=63,
        num_boost_round=300,
        early_stopping_rounds=20,
        early_stopping_share=5,
        num_threads=1,
        seed=3,
    )
    split = split_out_of_time(table, dataset.model_features(), as_of, params.early_stopping_share)
    booster = frozen(train_booster(split, params))
    truth = truth_dir / "deferred_charges.parquet" if truth_dir else None
    evaluation = evaluate_candidate(
        split.y_oot, predict(booster, split.x_oot), split.oot_rows["charge_id"], truth
    )
    return Candidate(table, dataset, params, split, booster, evaluation)


@pytest.fixture(scope="session")
def good_candidate(tmp_path_factory: pytest.TempPathFactory) -> Candidate:
    """A model with real signal, trained on a tiny synthetic dataset: once per session (each of
    the four modules using it trained it again; nothing changes a candidate)."""
    from registry.testing import synthetic_training_table

    root = tmp_path_factory.mktemp("good")
    table, _ = synthetic_training_table(12_000, FIRST_MONTH, MONTHS, seed=11)
    return _train(table, (root / "datasets").as_uri(), None)


@pytest.fixture(scope="module")
def worse_candidate(
    good_candidate: Candidate, tmp_path_factory: pytest.TempPathFactory
) -> Candidate:
    """Same OOT month, but trained on shuffled labels: it learned nothing."""
    from registry.testing import scramble_labels_before

    root = tmp_path_factory.mktemp("worse")
    table = scramble_labels_before(good_candidate.table, good_candidate.split.oot_month)
    return _train(table, (root / "datasets").as_uri(), None)


@pytest.fixture(scope="module")
def older_candidate(
    good_candidate: Candidate, tmp_path_factory: pytest.TempPathFactory
) -> Candidate:
    """The good candidate's data a month earlier: its out-of-time month is one the good
    candidate trained on."""
    root = tmp_path_factory.mktemp("older")
    return _train(good_candidate.table, (root / "datasets").as_uri(), None, months=MONTHS - 1)


@pytest.fixture
def registry_home(paylater_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PAYLATER_HOME with an empty, migrated MLflow sqlite store; bento builds off."""
    from registry.testing import empty_mlflow_db

    empty_mlflow_db(paylater_home / "mlflow.db")
    monkeypatch.setenv("PAYLATER_REGISTRY_BUILD_BENTO", "false")
    monkeypatch.setenv("PAYLATER_GATE_MAX_ECE", "0.05")  # tiny OOT month: ECE is mostly noise
    return paylater_home


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on loopback at a free port, SQLite backend, proxied artifacts: started once
    per session (~10 s on this machine; it was once per module, paid again by test_cli.py after
    test_policy.py), stopped after; its URL. Each test gets it as a fresh server looks to
    paylater through `mlflow_server` (see _forget_registry)."""
    from paylater.testing import listen_port

    server_home = tmp_path_factory.mktemp("mlflow-server")
    store = server_home / "store"
    store.mkdir()
    yield from _serve(listen_port(), server_home, store)


def _serve(port: int, server_home: Path, store: Path) -> Iterator[str]:
    """Run `mlflow server` at `port` on a copy of the empty store in `store` (log in server_home)
    until the generator is closed; yields its URL once it answers."""
    from paylater.testing import stop_group, wait_until_answering
    from registry.testing import empty_mlflow_db

    backend = store / "backend.db"
    empty_mlflow_db(backend)
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    log = (server_home / "server.log").open("wb")
    process = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{backend}",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{url}/health", process, server_home / "server.log", timeout=120)
        yield url
    finally:
        stop_group(process)
        log.close()


def _forget_registry(url: str) -> None:
    """Leave the server as a fresh one looks to paylater: no registered model (so versions number
    from 1 again), no generation of the transition lock, and the names of its experiments free (renamed: a deleted experiment keeps its
    name, and ensure_experiment would restore it with the earlier test's runs and audit history)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from registry.policy import LOCK_MODEL_PREFIX
    from registry.store import AUDIT_EXPERIMENT, MODEL_NAME, TRAINING_EXPERIMENT, is_absent

    c = MlflowClient(tracking_uri=url, registry_uri=url)
    locks = c.search_registered_models(f"name LIKE '{LOCK_MODEL_PREFIX}%'", max_results=1000)
    for name in [MODEL_NAME, *(m.name for m in locks)]:
        try:
            c.delete_registered_model(name)
        except MlflowException as exc:
            if not is_absent(exc):
                raise
    for name in (TRAINING_EXPERIMENT, AUDIT_EXPERIMENT):
        found = c.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":  # only an active one can be renamed
                c.restore_experiment(found.experiment_id)
            c.rename_experiment(found.experiment_id, f"{name}-done-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def mlflow_server(
    registry_home: Path, mlflow_server_process: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    """The module's real `mlflow server` as the registry, holding nothing paylater wrote before."""
    _forget_registry(mlflow_server_process)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server_process)
    return mlflow_server_process


@pytest.fixture(params=["sqlite", "server"])
def any_registry(request: pytest.FixtureRequest, registry_home: Path) -> str:
    """Each of the registry backends paylater runs on: the embedded SQLite store, and a real
    `mlflow server` (production's), whose REST layer checks what the SQL store takes on trust."""
    if request.param == "server":
        return str(request.getfixturevalue("mlflow_server"))
    from registry.store import tracking_uri

    return tracking_uri()


@pytest.fixture
def register() -> Callable[..., str]:
    """Register a candidate through the flow's register task; returns the version."""
    from flows.monthly_retrain import register as register_task

    def run(candidate: Candidate, issue: str | None = "4") -> str:
        result = register_task.fn(
            candidate.booster,
            candidate.split,
            candidate.params,
            candidate.dataset,
            candidate.evaluation,
            issue,
        )
        return str(result.version)

    return run


@pytest.fixture
def gate_and_stage() -> Callable[[Candidate, str], Any]:
    """Run the flow's gate task, then stage a passing candidate (as monthly_retrain does)."""
    from flows.monthly_retrain import gate, stage

    def run(candidate: Candidate, version: str) -> Any:
        decision = gate.fn(version, candidate.split, candidate.evaluation)
        if decision.passed:
            stage.fn(version, decision)
        return decision

    return run


@pytest.fixture
def mark_verified() -> Callable[[str], None]:
    """Record a passed staging verification (what `registry verify` writes)."""
    from registry.policy import record_verification

    def run(version: str) -> None:
        record_verification(
            version, True, "http://127.0.0.1:1", "test", "2026-11-27T00:00:00+00:00"
        )

    return run


@pytest.fixture
def releases(
    register: Callable[..., str],
    register_copy: Callable[[str], str],
    mark_verified: Callable[[str], None],
) -> Callable[..., list[str]]:
    """`count` versions of one candidate, in turn staged as a retrain would and verified, the
    first `promoted` of them (default: all) promoted to production ("release 0", "release 1",
    ...): a production history to roll back, or versions ready to promote."""
    from registry import policy
    from registry.testing import stage_as_retrain

    def run(candidate: Candidate, count: int, promoted: int | None = None) -> list[str]:
        first = register(candidate)
        versions = []
        for n in range(count):
            version = register_copy(first) if n else first
            stage_as_retrain(version)
            mark_verified(version)
            if n < (count if promoted is None else promoted):
                policy.promote(version, "production", f"release {n}", "alice")
            versions.append(version)
        return versions

    return run


@pytest.fixture
def fail_archiving(monkeypatch: pytest.MonkeyPatch) -> Callable[[], Callable[[], None]]:
    """Call it to make the registry fail when a transition archives a version (an interrupted
    promote or rollback); it returns the undo."""
    from registry import policy

    def start() -> Callable[[], None]:
        real_move = policy.move

        def fails_archiving(c: Any, version: str, to_stage: str, *args: Any) -> Any:
            if to_stage == "Archived":
                raise RuntimeError("tracking server answered 503")
            return real_move(c, version, to_stage, *args)

        monkeypatch.setattr(policy, "move", fails_archiving)
        return lambda: monkeypatch.setattr(policy, "move", real_move)

    return start


def _logged_model_id(source: str) -> str:
    """The logged model's id in a `models:/m-...` version source."""
    model_id = source.removeprefix("models:/")
    if model_id == source or not model_id.startswith("m-") or "/" in model_id:
        raise ValueError(f"not a logged model's source: {source!r}")
    return model_id


@pytest.fixture
def register_copy() -> Callable[[str], str]:
    """Another registry version of an already logged model: cheap versions, each as a retrain
    registers it (same run and logged model, its lineage tags; no gate or verification outcome).

    MLflow 3 registers a logged model by its id: the source is `models:/m-...`, which a tracking
    server accepts only with the `model_id` it names (the SQL store takes it on trust). MLflow
    3.17's stores keep no `model_id` on a version (ModelVersion.model_id reads None), so it is
    taken from the source.
    """
    from registry.policy import VERIFICATION_TAG
    from registry.store import MODEL_NAME, client

    outcomes = ("gate_", "rejected", VERIFICATION_TAG)

    def run(version: str) -> str:
        c = client()
        original = c.get_model_version(MODEL_NAME, version)
        lineage = {k: v for k, v in (original.tags or {}).items() if not k.startswith(outcomes)}
        assert original.source is not None, f"version {version} has no source to copy"
        copy = c.create_model_version(
            MODEL_NAME,
            original.source,
            run_id=original.run_id,
            tags=lineage,
            model_id=original.model_id or _logged_model_id(original.source),
        )
        return str(copy.version)

    return run


@pytest.fixture
def unreachable_registry(paylater_home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLFLOW_TRACKING_URI at a loopback port nobody listens on; no HTTP retries."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return url


@pytest.fixture
def place_lock() -> Callable[[str], None]:
    """Make `token` hold the transition lock, as a transition (alive or dead) that took it does:
    the lock's next generation, whoever held the one before."""
    from registry import policy
    from registry.store import client

    def run(token: str) -> None:
        c = client()
        assert policy._take(c, policy._latest_lock(c).number + 1, token), "the lock was not taken"

    return run
