"""The MLflow backend: processes that open a fresh embedded store at the same moment all get it;
a tracking server that cannot be reached is said in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from registry.store import RegistryError, require_reachable

QUICK_SHUTDOWN = {"poll_interval": 0.05}
"""serve_forever's default 0.5 s poll made every server's shutdown() wait up to 0.5 s."""

ROOT = Path(__file__).resolve().parents[2]

OPEN_WHEN_TOLD = """
import os, sys, time
import mlflow
from registry.store import client
open(sys.argv[2], "w").close()  # imported: at the start line
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
    ready = [tmp_path / f"ready-{i}" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_WHEN_TOLD, str(go), str(flag)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    # Every process has imported MLflow and waits at the start line (a fixed 8 s sleep here was
    # both too long on an idle machine and too short on a busy one).
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready):
        assert time.monotonic() < deadline, "the openers never got to the start line"
        assert all(p.poll() is None for p in procs), [
            p.stderr.read()[-600:] for p in procs if p.poll() is not None and p.stderr
        ]
        time.sleep(0.05)
    go.touch()
    outcomes = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    failed = [err[-600:] for code, err in outcomes if code != 0]
    assert not failed, failed


@contextmanager
def answering(status: int, tls: Path | None = None) -> Iterator[str]:
    """A loopback HTTP server answering every GET with `status` (over TLS with the cert.pem and
    key.pem in `tls`); yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls / "cert.pem", tls / "key.pem")
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs=QUICK_SHUTDOWN, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_tracking_server_is_named_in_seconds(unreachable_registry: str) -> None:
    started = time.monotonic()
    with pytest.raises(RegistryError, match=f"{unreachable_registry} is unreachable"):
        require_reachable()
    assert time.monotonic() - started < 5, "one request, not MLflow's retries"


def test_a_tracking_server_behind_a_failing_proxy_is_unreachable(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with answering(503) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        with pytest.raises(RegistryError, match=r"unreachable \(HTTP 503\)"):
            require_reachable()


def test_a_tracking_server_refusing_anonymous_requests_is_reachable(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with answering(401) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        require_reachable()


def test_an_embedded_store_needs_no_server(paylater_home: Path) -> None:
    require_reachable()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with cert.pem and key.pem: a self-signed certificate for 127.0.0.1 (a company CA's
    server, as far as a client that was not told to trust it can tell)."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return folder


def test_a_tracking_server_mlflow_is_told_to_trust_is_reachable(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch, self_signed: Path
) -> None:
    """MLflow trusts a server whose certificate is named by MLFLOW_TRACKING_SERVER_CERT_PATH (or
    any with MLFLOW_TRACKING_INSECURE_TLS): the retrain's check before training must ask the way
    MLflow will, not refuse to train against a server MLflow can use."""
    with answering(200, tls=self_signed) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        with pytest.raises(RegistryError, match=r"unreachable.*CERTIFICATE_VERIFY_FAILED"):
            require_reachable()  # not told to trust it: MLflow would refuse it too
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(self_signed / "cert.pem"))
        require_reachable()
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
        with pytest.warns(Warning, match="Unverified HTTPS request"):
            require_reachable()


def test_an_experiment_another_process_created_meanwhile_is_used_not_an_error(
    registry_home: Path,
) -> None:
    """Two processes using a fresh backend at once (the first retrain registering while a
    verification records its audit entry) both find no experiment, both create it: the second
    create failed with RESOURCE_ALREADY_EXISTS, failing a retrain or a transition half way."""
    from typing import Any

    from registry.store import client, ensure_experiment

    c = client()

    class CreatedJustAfterTheLookup:
        """The real client; another process creates the experiment right after our lookup."""

        def __getattr__(self, name: str) -> Any:
            return getattr(c, name)

        def get_experiment_by_name(self, name: str) -> Any:
            if c.get_experiment_by_name(name) is None:
                c.create_experiment(name)  # the other process
                return None
            return c.get_experiment_by_name(name)

    name = "paylater-default-registry-audit"
    racing: Any = CreatedJustAfterTheLookup()
    experiment_id = ensure_experiment(racing, name)
    created = c.get_experiment_by_name(name)
    assert created is not None and experiment_id == created.experiment_id


@contextmanager
def recording(status: int) -> Iterator[tuple[str, list[str]]]:
    """A loopback server standing in for a tracking server behind basic authentication: every
    request answered `status`; yields its URL and the Authorization headers it received."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs=QUICK_SHUTDOWN, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def mlflow_credentials_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLFLOW_TRACKING_USERNAME/PASSWORD unset now and again after the test, whoever set them."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # recorded, so the teardown restores the original state
        monkeypatch.delenv(name)


def test_credentials_in_the_tracking_uri_are_sent_but_never_shown(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch, mlflow_credentials_unset: None
) -> None:
    """MLflow quotes its tracking URI in every error (and run link): a password in the URI
    must still authenticate, and appear in none of them."""
    import base64

    from mlflow.exceptions import MlflowException

    from registry.store import client

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with recording(503) as (url, seen):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url.replace("://", "://alice:Wr0ngSecret@"))
        with pytest.raises(RegistryError, match=r"127\.0\.0\.1:\d+ is unreachable") as caught:
            require_reachable()
        assert "Wr0ngSecret" not in str(caught.value)
        with pytest.raises(MlflowException) as failed:
            client().search_experiments()
        assert "Wr0ngSecret" not in str(failed.value) and "127.0.0.1" in str(failed.value)
    basic = "Basic " + base64.b64encode(b"alice:Wr0ngSecret").decode()
    assert seen and all(header == basic for header in seen), seen


def test_a_registry_command_against_a_down_server_never_prints_its_password(
    unreachable_registry: str, monkeypatch: pytest.MonkeyPatch, mlflow_credentials_unset: None
) -> None:
    from typer.testing import CliRunner

    from registry.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", unreachable_registry.replace("://", "://a:Wr0ng@"))
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 1
    assert "Wr0ng" not in result.output and "127.0.0.1" in result.output, result.output
    assert "Connection refused" in result.output
