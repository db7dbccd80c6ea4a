"""The system run as its users run it, on loopback, with real servers and the real CLIs.

prefect server -> deploy --all -> a process worker -> `prefect deployment run daily-sync` -> the
event trigger starts feature-build -> `prefect deployment run monthly-retrain` (stages a candidate
and builds its bento) -> `bentoml serve` on staging -> `paylater registry verify` -> promote ->
`bentoml serve paylater-scorer:<version>` -> a job enqueued, scored by `paylater worker` over HTTP.
Every step checks what it left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from paylater.testing import listen_port, stop_group
from paylater.timeutil import default_as_of

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25
) -> Any:
    """Poll until `predicate` returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (httpx.HTTPError, OSError, psycopg.Error):
            value = None
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


class Processes:
    """Background servers of one test, each in its own process group, stopped at the end."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str | Path, **env: str) -> subprocess.Popen[bytes]:
        """Start `args` from the repository root with the test's environment plus `env`."""
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [str(a) for a in args],
            cwd=ROOT,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.running[name] = proc
        return proc

    def stop(self, name: str) -> None:
        """SIGTERM the process group, SIGKILL after 20 s."""
        proc = self.running.pop(name)
        if proc.poll() is None:
            stop_group(proc)

    def log(self, name: str) -> str:
        """The tail of a process's log, for failure messages."""
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        """Stop everything still running, the last started first: the Prefect worker before the
        server it reports to (stopped after its server, it spent 8 s failing to send its events)."""
        for name in reversed(list(self.running)):
            self.stop(name)


@pytest.fixture
def system(
    tmp_path: Path, pg_url: str, prefect_db_template: Path
) -> Iterator[tuple[Processes, dict[str, str]]]:
    """An environment of its own: PostgreSQL source, DuckDB, local datasets, MLflow, BentoML, and
    a Prefect server, started here and not waited for: the test has work to do meanwhile. The
    server's database starts as a copy of the session's migrated template (its own migrations
    took ~15 s of its start)."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "prefect").mkdir()
    shutil.copyfile(prefect_db_template, tmp_path / "prefect" / "prefect.db")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PAYLATER_", "MLFLOW_", "PREFECT_", "BENTOML_"))
    }
    prefect_port = listen_port()
    env.update(
        PAYLATER_HOME=str(home),
        PAYLATER_SOURCE_URL=pg_url,
        PAYLATER_CODE_DIR=str(ROOT),
        # Tiny data: the absolute gates are for real volumes; this test is about the path.
        PAYLATER_GATE_MIN_AUC="0.5",
        PAYLATER_GATE_MAX_ECE="0.5",
        PAYLATER_GATE_MIN_OOT_ROWS="1",
        PAYLATER_GATE_MIN_OOT_PER_CLASS="1",
        PAYLATER_GOLDEN_REQUEST_COUNT="5",
        PAYLATER_TRAIN_MIN_DATA_IN_LEAF="20",
        BENTOML_HOME=str(tmp_path / "bentoml"),
        BENTOML_DO_NOT_TRACK="true",
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    procs = Processes(tmp_path, env)
    procs.start(
        "prefect-server", BIN / "prefect", "server", "start", "--host", "127.0.0.1",
        "--port", str(prefect_port),
    )  # fmt: skip
    try:
        yield procs, env
    finally:
        procs.stop_all()


def run(env: dict[str, str], *args: str | Path, timeout: float = 600) -> str:
    """Run a CLI to completion from the repository root; fail with its output if it fails."""
    done = subprocess.run(
        [str(a) for a in args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def flow_runs(env: dict[str, str], deployment: str) -> list[Any]:
    """Flow runs of one deployment (name 'flow/deployment'), newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deployments = DeploymentFilter(name=DeploymentFilterName(any_=[deployment.split("/")[1]]))
    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        return list(client.read_flow_runs(deployment_filter=deployments))


def test_users_path(system: tuple[Processes, dict[str, str]]) -> None:
    procs, env = system
    as_of = default_as_of()
    prefect, paylater, bentoml = BIN / "prefect", BIN / "paylater", BIN / "bentoml"

    # The operational database: a small simulated world ending yesterday (Tokyo), generated
    # while the Prefect server starts (neither needs the other).
    run(env, paylater, "demo-data", "generate", "--users", "600", "--months", "8")
    wait_for(
        lambda: httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200,
        180,
        "prefect server",
    )

    # Deploy as an operator would, with schedules paused so only what the test starts runs.
    run(env, prefect, "work-pool", "create", "local-pool", "--type", "process")
    run(env, prefect, "--no-prompt", "deploy", "--all")
    run(env, prefect, "--no-prompt", "deployment", "schedule", "pause", "--all")
    procs.start("prefect-worker", prefect, "worker", "start", "--pool", "local-pool")

    # daily-sync by hand; its completion event starts feature-build for the same as_of.
    out = run(
        env, prefect, "deployment", "run", "daily-sync/daily-sync", "--param",
        f"as_of={as_of.isoformat()}", "--watch", "--watch-timeout", "600",
    )  # fmt: skip
    assert "Completed" in out, out

    def feature_build_done() -> Any:
        runs = flow_runs(env, "feature-build/feature-build")
        return runs if runs and runs[0].state and runs[0].state.is_final() else None

    (feature_run, *_) = wait_for(feature_build_done, 600, "feature-build started by the trigger", 1)
    assert feature_run.state.is_completed(), procs.log("prefect-worker")
    assert str(feature_run.parameters["as_of"]) == as_of.isoformat()
    manifest_path = (
        Path(env["PAYLATER_HOME"]) / "datasets" / "training" / f"as_of={as_of}" / "manifest.json"
    )
    manifest = json.loads(manifest_path.read_text())
    assert manifest["rows"] > 0 and manifest["source_watermark"]
    with psycopg.connect(env["PAYLATER_SOURCE_URL"]) as conn:
        online = conn.execute(
            "SELECT user_id FROM user_features_latest ORDER BY user_id LIMIT 1"
        ).fetchone()
    assert online, "feature-build published no online features"
    user_id = int(online[0])

    # monthly-retrain stages the first candidate and builds its bento.
    out = run(
        env, prefect, "deployment", "run", "monthly-retrain/monthly-retrain", "--param",
        "issue=e2e", "--watch", "--watch-timeout", "900",
    )  # fmt: skip
    assert "Completed" in out, out

    # The staging service starts (seconds) while the registry is read, is checked with the
    # golden requests, then promotion.
    staging_port = listen_port()
    procs.start(
        "bento-staging", bentoml, "serve", "bentos.service:PaylaterScorer", "--host", "127.0.0.1",
        "--port", str(staging_port), PAYLATER_SERVE_STAGE="staging",
    )  # fmt: skip
    listing = run(env, paylater, "registry", "list")
    assert "Staging" in listing, listing
    from mlflow import MlflowClient

    mlflow_db = f"sqlite:///{env['PAYLATER_HOME']}/mlflow.db"
    client = MlflowClient(tracking_uri=mlflow_db, registry_uri=mlflow_db)
    version = str(client.get_model_version_by_alias("paylater-default", "staging").version)
    assert client.get_model_version("paylater-default", version).tags.get("issue") == "e2e"
    staging = f"http://127.0.0.1:{staging_port}"
    wait_for(
        lambda: httpx.get(f"{staging}/readyz", timeout=2).status_code == 200, 180, "staging bento"
    )
    run(env, paylater, "registry", "verify", "--stage", "staging", "--url", staging)
    procs.stop("bento-staging")
    run(
        env,
        paylater,
        "registry",
        "promote",
        version,
        "--to",
        "production",
        "--reason",
        "e2e: verified on staging",
    )
    assert (
        str(client.get_model_version_by_alias("paylater-default", "production").version) == version
    )

    # The built bento of the promoted version (starting while the history is read), and a job
    # scored through it by the worker.
    prod_port = listen_port()
    procs.start(
        "bento-production", bentoml, "serve", f"paylater-scorer:{version}", "--host", "127.0.0.1",
        "--port", str(prod_port),
    )  # fmt: skip
    history = run(env, paylater, "registry", "history")
    assert "e2e: verified on staging" in history
    prod = f"http://127.0.0.1:{prod_port}"
    wait_for(
        lambda: httpx.get(f"{prod}/readyz", timeout=2).status_code == 200, 180, "production bento"
    )
    answer = httpx.post(
        f"{prod}/v2/score", json={"user_id": user_id, "amount_jpy": 10_000}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == version

    procs.start("scoring-worker", paylater, "worker", "--backend", "http", "--url", prod)
    run(
        env, paylater, "enqueue", "--user-id", str(user_id), "--amount-jpy", "10000",
        "--idempotency-key", "e2e-1", "--wait", "--timeout", "120",
    )  # fmt: skip
    with psycopg.connect(env["PAYLATER_SOURCE_URL"]) as conn:
        row = conn.execute(
            "SELECT r.model_version, r.probability, j.status FROM scoring_results r "
            "JOIN scoring_jobs j ON j.id = r.job_id WHERE j.idempotency_key = 'e2e-1'"
        ).fetchone()
    assert row is not None, procs.log("scoring-worker")
    assert row[0] == version and 0.0 < row[1] < 1.0 and row[2] == "done"
    assert abs(row[1] - answer.json()["default_probability"]) < 1e-9
