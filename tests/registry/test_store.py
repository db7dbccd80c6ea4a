"""The embedded MLflow store: processes that open a fresh one at the same moment all get it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

OPEN_WHEN_TOLD = """
import os, sys, time
import mlflow
from registry.store import client
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
client().search_experiments(max_results=1)
client().search_registered_models(max_results=1)
"""


def test_concurrent_first_opens_of_a_sqlite_store_all_succeed(tmp_path: Path) -> None:
    # Without the lock, 3 of 4 such processes failed here (alembic migrations colliding).
    go = tmp_path / "go"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PYTHONPATH": str(ROOT),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_WHEN_TOLD, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(8)  # let every process import MLflow and wait at the start line
    go.touch()
    outcomes = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    failed = [err[-600:] for code, err in outcomes if code != 0]
    assert not failed, failed
