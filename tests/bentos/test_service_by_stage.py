"""`bentoml serve bentos.service:PaylaterScorer`, the service started by registry stage, exercised
over real HTTP: a model it cannot load, a worker restarted after the alias moved, a registry out
of reach at start. Apart from test_service.py, whose servers serve a built bento: pytest-xdist
(--dist loadfile) hands out whole files, and together they took 75-105 s in one worker."""

from __future__ import annotations

import os
import re
import socket
import socketserver
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from paylater.testing import listen_port, stop_group
from tests.bentos.serving import call, serving

pytestmark = pytest.mark.slow


def attempts(answer: Any) -> int:
    """The attempt number a 503 while the model cannot be loaded names (0: none named); the
    next attempt is either counted down or, between the countdown and the attempt's end, under
    way ("trying again now")."""
    found = re.search(
        r"model load failed \(attempt (\d+), (?:next in \d+ s|trying again now)\)", str(answer)
    )
    return int(found.group(1)) if found else 0


def test_a_model_that_cannot_be_loaded_is_a_503_naming_why_on_every_route(
    serving_env: dict[str, str], tmp_path: Path
) -> None:
    """PAYLATER_SERVE_STAGE naming a version the registry lacks: the service stays up, not ready,
    and each route answers 503 with the reason; /model_info, what an operator asks first,
    answered 500 "an unexpected error has occurred" and logged a traceback per call. The load is
    tried again (at the cap, 0.2 s here: waiting cannot make the version appear, someone must act,
    and the reason says what to do) without a traceback or a log line per attempt."""
    request = {"user_id": 1, "amount_jpy": 5_000}
    env = {
        "PAYLATER_SERVE_STAGE": "999",
        "PAYLATER_API_TOKEN": "",
        "PAYLATER_SERVE_LOAD_RETRY_MAX_SECONDS": "0.2",
    }
    log = tmp_path / "serve.log"

    def tried_again(base: str) -> bool:
        """Both workers have tried to load at least 3 times, and failed."""
        return attempts(call(base, "/readyz", token=None)[1]) >= 3

    with serving("bentos.service:PaylaterScorer", env, log, tried_again) as server:
        base = server.base
        said = log.read_text()
        logged = re.findall(r"\[ERROR\] .*model load failed \(attempt (\d+)", said)
        assert logged == ["1", "1"], "the first failure of each worker, with its traceback, only"
        tracebacks = said.count("Traceback")
        assert call(base, "/readyz", token=None)[0] == 503
        for _ in range(4):  # each worker answers for itself
            for path, body in (
                ("/model_info", {}),
                ("/v2/score", request),
                ("/v1/score", {"customer_id": "1", "requested_yen": 5_000}),
            ):
                status, answer = call(base, path, body, token=None)
                assert status == 503, (path, status, answer)
                assert answer["error"] == "not_ready", (path, answer)
                assert attempts(answer) >= 3, (path, answer)
                assert "version=999" in answer["detail"], (path, answer)
                assert "paylater registry list" in answer["detail"], (path, answer)
        assert log.read_text().count("Traceback") == tracebacks, "a refusal is no crash"
        assert "(attempt 2," not in log.read_text(), "the same reason again is not logged"


@pytest.fixture(scope="module")
def production_in_store(serving_env: dict[str, str]) -> str:
    """The module's model store holding the production version, as on a host that served or
    built it before (and as in test_service.py, whose bento build imports it). Otherwise the
    first worker imports it from the registry, MLflow's imports included, while the other waits
    for the import lock: seconds, where importing in a worker is the out-of-reach test's case."""
    from bentos.build import ensure_imported

    return ensure_imported(serving_env["production_version"])


def test_a_service_started_by_alias_keeps_its_version_when_a_worker_restarts_after_the_alias_moved(
    serving_env: dict[str, str], production_in_store: str, catalog: SimpleNamespace, tmp_path: Path
) -> None:
    """`bentoml serve bentos.service:PaylaterScorer` serving `production`: the alias moves (a
    promotion), then BentoML restarts a worker (killed here, as by the OOM killer). Each worker
    resolved the alias itself when it started, so the restarted one served the new version next
    to the other's old one; the version is resolved once, when the service starts."""
    import psutil
    from mlflow import MlflowClient

    first, second = serving_env["production_version"], serving_env["staging_version"]
    env = {"PAYLATER_SERVE_STAGE": "production", "PAYLATER_API_TOKEN": ""}
    log = tmp_path / "serve.log"
    request = {"amount_jpy": 20_000, "features": catalog.users[1]}
    client = MlflowClient(serving_env["MLFLOW_TRACKING_URI"])

    def loaded() -> list[str]:
        """The model version each worker start loaded, in order."""
        return re.findall(r"serving model version (\S+) ", log.read_text())

    def ready(base: str) -> bool:
        return len(loaded()) == 2 and call(base, "/readyz", token=None)[0] == 200

    with serving("bentos.service:PaylaterScorer", env, log, ready) as server:
        workers = [
            p
            for p in psutil.Process(server.pid).children(recursive=True)
            if "_bentoml_impl.worker.service" in " ".join(p.cmdline())
        ]
        assert len(workers) == 2, workers
        client.set_registered_model_alias("paylater-default", "production", second)
        try:
            workers[0].kill()
            deadline = time.monotonic() + 60
            while len(loaded()) < 3 and time.monotonic() < deadline:
                assert "model load failed" not in log.read_text(), log.read_text()[-3000:]
                time.sleep(0.1)
            assert loaded() == [first, first, first], log.read_text()[-3000:]
            for _ in range(20):  # whichever worker answers
                status, answer = call(server.base, "/v2/score", request, token=None)
                assert (status, answer["model_version"]) == (200, first), answer
                assert call(server.base, "/model_info", {}, token=None)[1]["model_version"] == first
        finally:
            client.set_registered_model_alias("paylater-default", "production", first)


class _Pipe(socketserver.BaseRequestHandler):
    """Carry one connection's bytes both ways between its client and the relay's target."""

    server: Relay

    def handle(self) -> None:
        """Copy until either side closes."""
        import selectors

        with (
            socket.create_connection(("127.0.0.1", self.server.target)) as upstream,
            selectors.DefaultSelector() as selector,
        ):
            selector.register(self.request, selectors.EVENT_READ, (self.request, upstream))
            selector.register(upstream, selectors.EVENT_READ, (upstream, self.request))
            while True:
                for key, _ in selector.select():
                    source, sink = key.data
                    data = source.recv(65536)
                    if not data:
                        return
                    sink.sendall(data)


class Relay(socketserver.ThreadingTCPServer):
    """A loopback port forwarded to `target`: the network path to a server, which a test opens
    when that server should become reachable."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, target: int) -> None:
        self.target = target
        super().__init__(("127.0.0.1", port), _Pipe)


@contextmanager
def relaying(port: int, target: int) -> Iterator[None]:
    """Forward loopback `port` to `target` until the block ends."""
    import threading

    with Relay(port, target) as relay:
        thread = threading.Thread(target=relay.serve_forever, daemon=True)
        thread.start()
        try:
            yield
        finally:
            relay.shutdown()


def test_a_service_started_while_the_registry_is_out_of_reach_serves_once_it_answers(
    serving_env: dict[str, str], catalog: SimpleNamespace, tmp_path: Path
) -> None:
    """A deploy during a tracking-server restart: `bentoml serve bentos.service:PaylaterScorer`
    could not resolve `production`, each worker's load failed once, and the service stayed not
    ready (every route 503) until someone restarted it; Kubernetes does not restart a pod that
    is only not ready. Now the workers try again with backoff, say when, and serve the version
    the alias names once the server answers, both the same one, imported through the server."""
    import shutil

    from paylater.testing import wait_until_answering

    first = serving_env["production_version"]
    backend = tmp_path / "mlflow.db"
    shutil.copy(serving_env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"), backend)
    mlflow_port, relay_port = listen_port(), listen_port()
    mlflow_log = tmp_path / "mlflow.log"
    with mlflow_log.open("wb") as out:  # started at once: it takes seconds to come up
        mlflow = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                f"sqlite:///{backend}",
                "--workers",
                "1",
            ],
            env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    env = {
        "PAYLATER_SERVE_STAGE": "production",
        "PAYLATER_API_TOKEN": "",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{relay_port}",  # no way through yet
        "BENTOML_HOME": str(tmp_path / "bentoml"),  # an empty model store: import it
        "PAYLATER_SERVE_LOAD_RETRY_MAX_SECONDS": "0.2",
    }
    log = tmp_path / "serve.log"
    request = {"amount_jpy": 20_000, "features": catalog.users[1]}

    def failing_again(base: str) -> bool:
        """Both workers have failed to load at least twice."""
        return attempts(call(base, "/readyz", token=None)[1]) >= 2

    try:
        with serving("bentos.service:PaylaterScorer", env, log, failing_again) as server:
            status, answer = call(server.base, "/v2/score", request, token=None)
            assert (status, answer["error"]) == (503, "not_ready"), answer
            detail = answer["detail"]
            assert "could not be resolved when the service started" in detail, detail
            assert "unreachable" in detail and "make the registry reachable" in detail, detail
            wait_until_answering(f"http://127.0.0.1:{mlflow_port}/health", mlflow, mlflow_log, 120)
            with relaying(relay_port, mlflow_port):
                deadline, ready_in_a_row = time.monotonic() + 60, 0
                while ready_in_a_row < 10:  # each worker answers for itself
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    ready = call(server.base, "/readyz", token=None)[0] == 200
                    ready_in_a_row = ready_in_a_row + 1 if ready else 0
                    time.sleep(0.05 if ready else 0.1)
                for _ in range(10):  # whichever worker answers
                    status, answer = call(server.base, "/v2/score", request, token=None)
                    assert (status, answer["model_version"]) == (200, first), answer
        said = log.read_text()
        assert re.findall(r"serving model version (\S+) ", said) == [first, first], said[-3000:]
        assert said.count("(unresolved at start, asked again)") == 1, "one asks, both serve it"
        logged = re.findall(r"\[ERROR\] .*model load failed \(attempt (\d+)", said)
        assert logged == ["1", "1"], said[-3000:]
    finally:
        stop_group(mlflow)
