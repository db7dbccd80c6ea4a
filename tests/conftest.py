"""Shared fixtures: a real PostgreSQL server, an isolated PAYLATER_HOME, the Prefect test harness."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

_BACKEND_VARS = (
    "PAYLATER_SOURCE_URL",
    "PAYLATER_WAREHOUSE_URL",
    "PAYLATER_DATASET_URL",
    "MLFLOW_TRACKING_URI",
    "PAYLATER_MLFLOW_TRACKING_URI",
)

RAM_TMP_ROOT = Path("/dev/shm")
"""Linux's RAM-backed tmpfs, where the suite's temporary files go when it has room."""
RAM_TMP_MIN_FREE = 4 << 30
"""Below this much free space there (a container's default /dev/shm is 64 MiB) they stay on disk."""


def pytest_configure(config: pytest.Config) -> None:
    """Put the suite's temporary files (pytest's tmp_path, every tempfile user, and the servers
    the tests start, which inherit TMPDIR) on RAM_TMP_ROOT when TMPDIR is not set.

    The suite's SQLite, DuckDB and MLflow stores sync to disk on every commit: 15.6 ms a commit
    on the development machine's disk against 0.07 ms on tmpfs. Nothing a test checks depends on
    a file surviving a power cut. A run writes about 0.4 GB there; a passed test's folder goes
    when it ends (tmp_path_retention_policy, pyproject.toml). Under xdist the workers inherit
    the controller's TMPDIR.
    """
    if os.environ.get("TMPDIR") or not os.access(RAM_TMP_ROOT, os.W_OK):
        return
    if shutil.disk_usage(RAM_TMP_ROOT).free < RAM_TMP_MIN_FREE:
        return
    folder = RAM_TMP_ROOT / f"paylater-test-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # gettempdir() caches its first answer: ask again


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """URL of the real PostgreSQL server that `make test` starts (scripts/ensure_postgres.sh)."""
    url = os.environ.get("PAYLATER_TEST_PG_URL")
    if not url:
        pytest.fail(
            "PAYLATER_TEST_PG_URL is unset: run `make test`, or `make postgres && source var/postgres.env`"
        )
    return url


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty database on the real server, dropped after the test.

    Its sessions commit without waiting for the WAL's disk flush (synchronous_commit off: 0.25
    against 3.9 ms a commit on the development machine); a commit is still atomic and visible at
    once, and only a server crash could lose the last ones, which no test checks.
    """
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    base, _, _ = pg_server_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def paylater_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty PAYLATER_HOME with every backend URL unset, so embedded defaults land in tmp."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PAYLATER_HOME", str(home))
    for var in _BACKEND_VARS:
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def prefect_db_template() -> Path:
    """A migrated, empty Prefect server database for the session's Prefect servers to start from.

    A server on a fresh database spends ~15 s in its migrations before it answers; this file is
    migrated once per machine and Prefect version (`prefect server database upgrade`, into a
    scratch file published atomically by registry.testing.cached_template), then copied.
    """
    import prefect

    from registry.testing import cached_template

    def migrate(scratch: Path) -> None:
        home = scratch.with_suffix(".home")
        env = os.environ | {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{scratch}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        prefect_bin = Path(sys.executable).parent / "prefect"
        done = subprocess.run(
            [str(prefect_bin), "server", "database", "upgrade", "-y"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        shutil.rmtree(home, ignore_errors=True)
        assert done.returncode == 0, (
            f"migrating a Prefect database failed:\n{done.stdout}{done.stderr}"
        )

    return cached_template(f"prefect-{prefect.__version__}.db", migrate)


@pytest.fixture(scope="session")
def prefect_harness(prefect_db_template: Path) -> Iterator[None]:
    """One ephemeral Prefect API for the whole session; request it from flow tests.

    prefect_test_harness puts its database, prefect-test.db, in a folder of its own from
    mkdtemp: that folder gets a copy of the migrated template first, so the harness's server
    starts in ~11 s instead of ~26 s. Should a Prefect release name the file otherwise, the copy
    is merely unused and the server migrates its own database, as before.

    Flow-run heartbeats are off in this process: Prefect's heartbeat thread sleeps in 1 s steps
    and every flow run waits for it to notice the run ended (about 1 s per flow and subflow run:
    a flow with one subflow took 2.2 s with them, 0.7 s without). Heartbeats only let a server
    notice a run whose process vanished; no test here relies on them (a killed run is reported
    Crashed by its Runner, which is what tests/tasks/test_monitoring_flow_runs.py checks).
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing import utilities

    def seeded_mkdtemp() -> str:
        folder = tempfile.mkdtemp()
        shutil.copyfile(prefect_db_template, Path(folder) / "prefect-test.db")
        return folder

    with (
        mock.patch.object(utilities, "mkdtemp", seeded_mkdtemp),
        utilities.prefect_test_harness(server_startup_timeout=180),
        temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        try:
            yield
        finally:
            # The harness logs "Stopping temporary server" at INFO through Prefect's console
            # handler, whose stream a pytest-xdist worker has closed by session teardown: a
            # "--- Logging error ---" traceback at the end of every parallel run, for a line
            # nobody needs.
            logging.getLogger("prefect").setLevel(logging.WARNING)


@pytest.fixture
def silent_postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A postgresql:// URL whose host takes the TCP connection and never answers (a server stuck
    in startup, a proxy whose backend is gone); connect_timeout lowered to 2 s for the test."""
    import socket

    from paylater import postgres

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever answers libpq
    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT_SECONDS", 2)
    try:
        yield f"postgresql://paylater:secret@127.0.0.1:{silent.getsockname()[1]}/db"
    finally:
        silent.close()
