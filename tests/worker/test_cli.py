"""`paylater worker` / `paylater enqueue` as real processes: concurrency, kill -9, SIGTERM, metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from paylater.testing import listen_port

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

COUNT = "SELECT count(*) FROM scoring_jobs WHERE status = %s"
ENQUEUE_USER_3 = [
    sys.executable,
    "-m",
    "paylater.cli",
    "enqueue",
    "--user-id",
    "3",
    "--amount-jpy",
    "5000",
]
"""`paylater enqueue` of one valid request, run as a process (flags for the queue follow)."""


class Launcher:
    """Starts `paylater worker` processes on the test model, all with `env`, each with its log."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def __call__(self, *args: str) -> subprocess.Popen[bytes]:
        """One worker process with `args` added to its command line."""
        log = self.log_dir / f"worker-{len(self.started)}.log"
        cmd = [sys.executable, "-m", "paylater.cli", "worker", "--model", "paylater-default:7"]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*cmd, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.started.append((proc, log))
        return proc

    def logs(self) -> dict[int, str]:
        """Each started process's output so far, by pid."""
        return {p.pid: log.read_text() for p, log in self.started}


@pytest.fixture
def launch(queue_db: str, model_store: Path, tmp_path: Path) -> Iterator[Launcher]:
    """Start `paylater worker` processes on the test model; every one left running is killed."""
    env = {
        **os.environ,
        "BENTOML_HOME": str(model_store),
        "PAYLATER_HOME": str(tmp_path),
        "PAYLATER_WORKER_DATABASE_URL": queue_db,
        "PAYLATER_WORKER_SHADOW_MODEL": "",
    }
    launcher = Launcher(env, tmp_path)
    yield launcher
    for proc, _ in launcher.started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def features_locked(url: str) -> Iterator[None]:
    """Hold user_features_latest so workers block right after claiming (a batch in hand)."""
    import psycopg

    conn = psycopg.connect(url)
    conn.execute("LOCK TABLE user_features_latest IN ACCESS EXCLUSIVE MODE")
    try:
        yield
    finally:
        conn.rollback()
        conn.close()


def count(kit: Any, url: str, status: str) -> int:
    """Jobs in `status`."""
    return int(kit.query(url, COUNT, (status,))[0][0])


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM and the exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def processed(log: str) -> int:
    """The processed count of a worker's exit line."""
    found = re.search(r"worker stopped: .*processed=(\d+)", log)
    assert found, log[-2000:]
    return int(found.group(1))


def free_port() -> int:
    """A port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_four_workers_never_double_score_and_sigterm_drains(
    queue_db: str, launch: Launcher, kit: Any
) -> None:
    """Four processes each hold a batch at once; one gets SIGTERM then: it writes that batch and
    exits 0 without claiming more, and the other three score the rest, every job exactly once."""
    kit.enqueue_many(queue_db, 2_000)
    port = listen_port()
    with features_locked(queue_db):
        procs = [
            launch("--batch-size", "25", "--concurrency", "1", *extra)
            for extra in (["--metrics-port", str(port), "--metrics-host", "127.0.0.1"], [], [], [])
        ]
        kit.wait_until(lambda: count(kit, queue_db, "running") == 100, 90, "4 workers x 25 claimed")
        drained = procs[3]
        drained.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert drained.poll() is None  # still blocked on its batch
    assert drained.wait(timeout=30) == 0
    assert processed(launch.logs()[drained.pid]) == 25
    kit.wait_until(lambda: count(kit, queue_db, "done") == 2_000, 60, "all jobs done")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "paylater_worker_queue_depth 0.0" in metrics
    assert re.search(r"paylater_worker_jobs_processed_total [1-9]", metrics)
    assert "paylater_worker_job_latency_seconds_bucket" in metrics
    assert [stop(p) for p in procs[:3]] == [0, 0, 0]
    per_worker = [processed(log) for log in launch.logs().values()]
    assert sum(per_worker) == 2_000 and min(per_worker) > 0, per_worker
    assert kit.query(queue_db, "SELECT count(*), count(DISTINCT job_id) FROM scoring_results") == [
        (2_000, 2_000)
    ]
    assert kit.query(queue_db, "SELECT max(attempts) FROM scoring_jobs") == [(1,)]


def test_kill_9_mid_batch_every_job_still_scored_once(
    queue_db: str, launch: Launcher, kit: Any
) -> None:
    """A worker killed holding a batch loses nothing: its lease runs out and another scores it."""
    kit.enqueue_many(queue_db, 300)
    args = ("--batch-size", "100", "--concurrency", "1", "--lease-seconds", "2")
    with features_locked(queue_db):
        victim, survivor = launch(*args), launch(*args)
        kit.wait_until(lambda: count(kit, queue_db, "running") == 200, 60, "two claimed batches")
        victim_jobs = {
            r[0]
            for r in kit.query(queue_db, "SELECT id FROM scoring_jobs WHERE status = 'running'")
        }
        victim.kill()
        victim.wait()
    kit.wait_until(lambda: count(kit, queue_db, "done") == 300, 60, "all jobs done")

    # `paylater enqueue --wait` against the live worker.
    enqueue = [sys.executable, "-m", "paylater.cli", "enqueue", "--user-id", "5"]
    answer = subprocess.run(
        [*enqueue, "--amount-jpy", "20000", "--wait", "--timeout", "20"],
        env=launch.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert answer.returncode == 0, answer.stderr
    job_line, result_line = answer.stdout.strip().splitlines()
    result = json.loads(result_line)
    assert result["id"] == int(job_line) and result["status"] == "done"
    assert result["decision"] in ("approve", "decline") and result["model_version"] == "7"

    assert stop(survivor) == 0
    assert processed(launch.logs()[survivor.pid]) == 301
    rows = kit.query(
        queue_db,
        """SELECT j.id, j.attempts, j.error, count(r.job_id) FROM scoring_jobs j
           LEFT JOIN scoring_results r ON r.job_id = j.id GROUP BY j.id""",
    )
    assert len(rows) == 301 and all(r[3] == 1 for r in rows)
    retried = {r[0] for r in rows if r[1] == 2}
    assert len(retried) == 100 and retried < victim_jobs  # exactly the killed worker's batch
    assert all("lease expired" in r[2] for r in rows if r[0] in retried)
    assert all(r[1] == 1 and r[2] is None for r in rows if r[0] not in retried)


def test_enqueue_is_idempotent_and_refuses_sqlite(
    queue_db: str, launch: Launcher, kit: Any
) -> None:
    """The same key twice prints the same job id, the key for another request is refused; a
    SQLite queue URL is a clear error."""
    cmd = list(ENQUEUE_USER_3)
    runs = [
        subprocess.run(
            [*cmd, "--idempotency-key", "order-9"], env=launch.env, capture_output=True, text=True
        )
        for _ in range(2)
    ]
    assert [r.returncode for r in runs] == [0, 0]
    assert runs[0].stdout == runs[1].stdout and "already enqueued" in runs[1].stderr
    assert kit.query(queue_db, "SELECT count(*) FROM scoring_jobs") == [(1,)]
    # The key for another amount: refused, never the first request's job (or its result).
    other = [*cmd[:-1], "6000", "--idempotency-key", "order-9"]
    reused = subprocess.run(other, env=launch.env, capture_output=True, text=True)
    assert reused.returncode == 2 and reused.stdout == ""
    assert reused.stderr.startswith("error: ") and "needs a key of its own" in reused.stderr
    empty = subprocess.run(
        [*cmd, "--idempotency-key", ""], env=launch.env, capture_output=True, text=True
    )
    assert empty.returncode == 2 and empty.stdout == ""
    assert empty.stderr.startswith("error: ") and "is empty" in empty.stderr
    sqlite = subprocess.run(
        [*cmd, "--database-url", "sqlite:///x.db"], env=launch.env, capture_output=True, text=True
    )
    assert sqlite.returncode == 2 and "needs PostgreSQL" in sqlite.stderr
    # Told to fix what it gave, not an environment variable it did not set.
    assert sqlite.stderr.startswith("error: ") and "Set --database-url to" in sqlite.stderr


def test_a_queue_database_apart_from_the_source_reads_features_from_the_source(
    queue_db: str, pg_server_url: str, launch: Launcher, kit: Any
) -> None:
    """The feature build publishes user_features_latest to the source: with the queue in a
    database of its own (no such table there), an in-process worker still scores every job."""
    import uuid

    import psycopg

    name = f"t_queue_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    queue_only = f"{pg_server_url.rpartition('/')[0]}/{name}"
    try:
        launch.env["PAYLATER_SOURCE_URL"] = queue_db  # the source: features published here
        launch.env["PAYLATER_WORKER_DATABASE_URL"] = queue_only
        proc = launch("--concurrency", "1")
        kit.wait_until(
            lambda: (
                kit.query(queue_only, "SELECT to_regclass('scoring_jobs') IS NOT NULL") == [(True,)]
            ),
            60,
            "the worker to create its queue",
        )
        kit.enqueue_many(queue_only, 50)
        kit.wait_until(lambda: count(kit, queue_only, "done") == 50, 60, "the jobs to be scored")
        assert stop(proc) == 0
        assert kit.query(queue_only, "SELECT to_regclass('user_features_latest')") == [(None,)]
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_an_http_worker_warns_when_its_lease_is_too_short_to_search_a_hanging_batch(
    launch: Launcher,
) -> None:
    """The scoring timeout is a setting, and a lease under three of them is said at start: such
    a worker gives a batch holding a request the service hangs on back instead of searching it."""
    launch.env["PAYLATER_WORKER_SCORING_TIMEOUT_SECONDS"] = "4"
    url = f"http://127.0.0.1:{free_port()}"
    short = launch("--backend", "http", "--url", url, "--lease-seconds", "10")
    enough = launch("--backend", "http", "--url", url, "--lease-seconds", "12")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
        "worker started" in text for text in launch.logs().values()
    ):
        time.sleep(0.2)
    assert stop(short) == 0 and stop(enough) == 0
    logs = launch.logs()
    assert "lease 10 s is under three scoring timeouts (4 s)" in logs[short.pid], logs[short.pid]
    assert "under three scoring timeouts" not in logs[enough.pid], logs[enough.pid]


def test_a_model_that_cannot_be_loaded_is_one_error_line(queue_db: str, launch: Launcher) -> None:
    """A store tag the model store lacks (or an alias no version holds) stops the worker with one
    line naming it, not a traceback."""
    proc = launch("--model", "paylater-default:999")
    assert proc.wait(timeout=60) == 1
    (log,) = launch.logs().values()
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines[-1].startswith("error: cannot load model 'paylater-default:999': ")
    assert "Traceback" not in log


def test_a_worker_following_an_alias_asks_a_tracking_server_that_is_down_in_seconds(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--model production` and the default shadow 'staging' ask the registry every minute,
    with a claimed batch in hand (the shadow's question, then, under a lock every loop waited on).
    With the tracking server down, MLflow's own retries made each question take minutes
    (about 250 s here) while the batch's 30 s lease ran out. The version in hand keeps scoring."""
    from worker import cli

    class InHand:
        model_version = "7"

        def score(self, requests: Sequence[Any]) -> list[Any]:
            return []

        def close(self) -> None:
            pass

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setattr(cli, "MODEL_REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(cli, "SHADOW_REFRESH_SECONDS", 0.0)
    following = cli.FollowingBackend("production", "unused", "declines", InHand())
    shadow = cli.ShadowLoader("staging", lambda: following.model_version, "unused")
    started = time.monotonic()
    assert following.score([]) == [] and following.model_version == "7"
    shadow.refresh()  # what the shadow's refresh thread does
    assert shadow.current is None
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--max-attempts", "0"),
        ("--batch-size", "0"),
        ("--concurrency", "0"),
        ("--lease-seconds", "0"),
        ("--backend", "grpc"),
        ("--reason-codes", "some"),
    ],
)
def test_a_worker_option_out_of_range_is_refused_before_any_job_is_touched(
    queue_db: str, launch: Launcher, kit: Any, option: str, value: str
) -> None:
    """The settings refuse these values, the command-line overrides did not: --max-attempts 0
    dead-lettered every job unscored (\"lease expired\"), --batch-size 0 claimed nothing forever,
    --concurrency 0 exited at once saying it stopped, --lease-seconds 0 let every batch be claimed
    again while being scored. Each is now a usage error (exit 2) naming the option."""
    ids = kit.enqueue_many(queue_db, 3)
    proc = launch(option, value)
    kit.wait_until(lambda: proc.poll() is not None, 30, f"the worker to refuse {option} {value}")
    assert proc.returncode == 2
    assert option in launch.logs()[proc.pid]
    rows = kit.query(
        queue_db, "SELECT status, attempts FROM scoring_jobs WHERE id = ANY(%s)", (ids,)
    )
    assert rows == [("queued", 0)] * 3


def test_a_bad_queue_database_url_is_one_error_line_without_its_password(
    pg_server_url: str, tmp_path: Path
) -> None:
    """A wrong password, or a URL libpq cannot parse (its error quotes the URL whole), is one
    line naming the host and the reason: never the password, never a traceback of locals."""
    host = pg_server_url.rpartition("@")[2]
    env = {**os.environ, "PAYLATER_HOME": str(tmp_path)}
    cmd = list(ENQUEUE_USER_3)
    for url, reason in [
        (f"postgresql://postgres:Wr0ngSecret@{host}", "password authentication failed"),
        ("postgresql://postgres:Wr0ngSecret@[::1/postgres", "IPv6 host address"),
    ]:
        run = subprocess.run(
            [*cmd, "--database-url", url], env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 1, run.stderr
        assert "Wr0ngSecret" not in run.stdout + run.stderr
        assert run.stderr.startswith("error: ") and reason in run.stderr
        assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) == 1


def test_an_http_worker_logs_no_line_per_scoring_call(
    queue_db: str, launch: Launcher, kit: Any
) -> None:
    """httpx logs every request it sends at INFO, which the worker's logging passed: one line per
    batch (hundreds a minute under load) burying the worker's own lines. Its calls are not
    logged one by one; failures still are, by the worker, with the status and the reason."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Scoring(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            """Approve every request of the batch."""
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            answer = json.dumps(
                [
                    {
                        "default_probability": 0.1,
                        "decision": "approve",
                        "model_version": "7",
                        "reason_codes": [],
                    }
                    for _ in body
                ]
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Scoring)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}).start()
    try:
        kit.enqueue_many(queue_db, 20)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proc = launch("--backend", "http", "--url", url, "--batch-size", "5")
        kit.wait_until(lambda: count(kit, queue_db, "done") == 20, 60, "the jobs to be scored")
        assert stop(proc) == 0
    finally:
        server.shutdown()
        server.server_close()
    (log,) = launch.logs().values()
    assert processed(log) == 20
    assert "HTTP Request" not in log, log[-2000:]


def test_a_model_whose_file_is_gone_from_the_store_is_one_error_line(
    launch: Launcher, model_store: Path, tmp_path: Path
) -> None:
    """The store's entry there but its file gone (a disk cleaned by hand, a partial copy of the
    store): the worker died with LightGBM's traceback. It is one line naming the tag and the way
    out, as for a tag the store lacks."""
    import shutil

    store = tmp_path / "bentoml"
    shutil.copytree(model_store, store)
    (model_file,) = (store / "models" / "paylater-default" / "7").glob("saved_model.*")
    model_file.unlink()
    launch.env["BENTOML_HOME"] = str(store)
    proc = launch("--model", "paylater-default:7")
    assert proc.wait(timeout=60) == 1
    (log,) = launch.logs().values()
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines[-1].startswith("error: cannot load model 'paylater-default:7': "), log[-2000:]
    assert model_file.name in lines[-1] and "paylater bento import" in lines[-1], lines[-1]
    assert "Traceback" not in log


def test_a_metrics_port_already_taken_is_one_error_line(
    queue_db: str, launch: Launcher, kit: Any
) -> None:
    """--metrics-port on a port another process listens on (a second worker started on the same
    host with the same settings): the worker died with an OSError traceback. It is one line
    naming the address, before any job is claimed."""
    kit.enqueue_many(queue_db, 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = launch("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
        assert proc.wait(timeout=60) == 1
    (log,) = launch.logs().values()
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: cannot serve metrics on 127.0.0.1:{port}: "), log[-2000:]
    assert "Traceback" not in log
    assert kit.query(queue_db, "SELECT status, attempts FROM scoring_jobs") == [("queued", 0)]


@pytest.mark.parametrize(
    ("args", "flag", "accepted"),
    [
        (["--user-id", "99999999999999999999"], "--user-id", "1..9223372036854775807"),
        (["--user-id", "0"], "--user-id", "1..9223372036854775807"),
        (["--user-id", "-4"], "--user-id", "1..9223372036854775807"),
        (["--amount-jpy", "999"], "--amount-jpy", "1000..100000"),
        (["--amount-jpy", "100001"], "--amount-jpy", "1000..100000"),
        (["--amount-jpy", "-5000"], "--amount-jpy", "1000..100000"),
        (["--idempotency-key", "k" * 8192], "--idempotency-key", "at most 255 characters"),
        (["--timeout", "-1", "--wait"], "--timeout", "more than 0 seconds"),
    ],
)
def test_enqueue_refuses_input_out_of_range_with_one_line_and_inserts_nothing(
    queue_db: str, launch: Launcher, kit: Any, args: list[str], flag: str, accepted: str
) -> None:
    """An id past bigint, a non-positive id, an amount the product does not lend, a key too long
    to index, a negative --timeout: one error line naming the flag and what it accepts."""
    given = dict(zip(args[::2], args[1::2], strict=False))
    base = {"--user-id": "3", "--amount-jpy": "5000"}
    cmd = [sys.executable, "-m", "paylater.cli", "enqueue"]
    for option, value in base.items():
        if option not in given:
            cmd += [option, value]
    run = subprocess.run([*cmd, *args], env=launch.env, capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} ")
    assert accepted in lines[0] and "Traceback" not in run.stderr
    assert kit.query(queue_db, "SELECT count(*) FROM scoring_jobs") == [(0,)]


def test_the_reason_code_modes_settings_accept_are_the_ones_the_backend_takes() -> None:
    """PAYLATER_WORKER_REASON_CODES and --reason-codes check against the settings' Literal; the
    in-process backend against its own tuple: a mode added to one only would pass the settings
    and fail the worker at start."""
    from typing import get_args

    from paylater.settings import ReasonCodeMode
    from worker.scoring import REASON_CODE_MODES

    assert sorted(get_args(ReasonCodeMode)) == sorted(REASON_CODE_MODES)
