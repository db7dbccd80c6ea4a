"""Staging verification against a small real HTTP service that answers like the bento's /v2/score."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from paylater.cli import app
from paylater.product import fee_for
from registry import history, policy
from registry.store import MODEL_NAME, client
from registry.testing import stage_as_retrain
from tasks.training import predict

QUICK_SHUTDOWN = {"poll_interval": 0.05}
"""serve_forever's default 0.5 s poll made every server's shutdown() wait up to 0.5 s."""


@contextmanager
def scoring_service(
    booster: Any,
    features: list[str],
    version: str,
    bias: float = 0.0,
    ready_after: float = 0.0,
    basic_auth: str | None = None,
) -> Iterator[str]:
    """POST /v2/score computed with `booster` (plus `bias`) on 127.0.0.1 at a free port; GET
    /readyz answers 503 (loading) for the first `ready_after` seconds, then 200. With
    `basic_auth` ("user:password"), every request without it is answered 401 (a proxy's basic
    authentication in front of the service)."""
    ready_at = time.monotonic() + ready_after
    expected_auth = (
        f"Basic {base64.b64encode(basic_auth.encode()).decode()}" if basic_auth else None
    )

    class Handler(BaseHTTPRequestHandler):
        def parse_request(self) -> bool:
            if not super().parse_request():
                return False
            if expected_auth and self.headers.get("Authorization") != expected_auth:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="staging"')
                self.send_header("Content-Length", "12")
                self.end_headers()
                self.wfile.write(b"unauthorized")
                return False
            return True

        def do_GET(self) -> None:
            if self.path != "/readyz":
                self.send_error(404)
                return
            loading = time.monotonic() < ready_at
            self.send_response(503 if loading else 200)
            self.send_header("Content-Length", "7" if loading else "2")
            self.end_headers()
            self.wfile.write(b"loading" if loading else b"ok")

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v2/score":
                self.send_error(404)
                return
            amount = body["amount_jpy"]
            row = {"request_amount_jpy": amount, "request_fee_jpy": fee_for(amount)} | body[
                "features"
            ]
            x = np.array([[np.nan if row[n] is None else row[n] for n in features]], dtype=float)
            answer = {
                "default_probability": float(predict(booster, x)[0]) + bias,
                "decision": "approve",
                "model_version": version,
                "reason_codes": [],
            }
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs=QUICK_SHUTDOWN, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_verify_passes_for_the_right_model_then_promote_accepts(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    version = register(good_candidate)
    stage_as_retrain(version)
    features = good_candidate.split.feature_names
    runner = CliRunner()

    with scoring_service(good_candidate.booster, features, version, bias=1e-6) as url:
        result = runner.invoke(
            app, ["registry", "verify", "--stage", "staging", "--url", url, "--actor", "carol"]
        )
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "expected" in result.output
    refused = runner.invoke(
        app, ["registry", "promote", version, "--to", "production", "--reason", "ok"]
    )
    assert refused.exit_code == 1 and "no passed staging verification" in refused.output
    assert policy.alias_version(client(), "production") is None

    with scoring_service(good_candidate.booster, features, "999") as url:
        result = runner.invoke(app, ["registry", "verify", "--version", version, "--url", url])
    assert result.exit_code == 1 and "model_version '999'" in result.output

    with scoring_service(good_candidate.booster, features, version) as url:
        result = runner.invoke(app, ["registry", "verify", "--stage", "staging", "--url", url])
    assert result.exit_code == 0, result.output
    assert "20/20 golden requests matched" in result.output
    tags = client().get_model_version(MODEL_NAME, version).tags
    assert tags["staging_verification"] == "passed" and tags["staging_verification_url"] == url

    promoted = runner.invoke(
        app,
        [
            "registry",
            "promote",
            version,
            "--to",
            "production",
            "--reason",
            "verified on staging",
            "--actor",
            "carol",
        ],
    )
    assert promoted.exit_code == 0, promoted.output
    assert policy.resolve_version("production") == version
    actions = [(e.action, e.actor) for e in history.read(client(), version)]
    assert ("verify", "carol") in actions and actions[-1] == ("promote", "carol")


def test_verify_against_nothing_listening_fails_cleanly(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    import socket

    version = register(good_candidate)
    stage_as_retrain(version)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(
        app,
        [
            "registry",
            "verify",
            "--stage",
            "staging",
            "--url",
            f"http://127.0.0.1:{port}",
            "--timeout",
            "1",
            "--ready-timeout",
            "1",
        ],
    )
    assert result.exit_code == 1
    assert "was not ready within 1 s" in result.output, result.output
    assert "nothing was verified or recorded" in result.output
    tags = client().get_model_version(MODEL_NAME, version).tags
    assert "staging_verification" not in tags, "a service never reached judges no model"


def test_verify_waits_for_a_service_still_loading_its_model(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    """`bentoml serve … &` then verify at once (the README's order): the service answers /readyz
    503 while it loads; verify waits instead of recording a failure."""
    version = register(good_candidate)
    stage_as_retrain(version)
    features = good_candidate.split.feature_names
    with scoring_service(good_candidate.booster, features, version, ready_after=2.0) as url:
        result = CliRunner().invoke(app, ["registry", "verify", "--stage", "staging", "--url", url])
    assert result.exit_code == 0, result.output
    assert "20/20 golden requests matched" in result.output
    tags = client().get_model_version(MODEL_NAME, version).tags
    assert tags["staging_verification"] == "passed"


def test_golden_requests_are_the_models_own_answers(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    from registry.runs import load_booster, load_golden

    version = register(good_candidate)
    golden = load_golden(version)
    assert len(golden) == 20
    features = good_candidate.split.feature_names
    loaded = load_booster(version)
    for case in golden:
        request = case["request"]
        assert set(request) == {"amount_jpy", "features"}
        assert set(request["features"]) == set(features[2:])
        row = {
            "request_amount_jpy": request["amount_jpy"],
            "request_fee_jpy": fee_for(request["amount_jpy"]),
        }
        row |= request["features"]
        x = np.array([[row[n] for n in features]], dtype=float)
        assert float(predict(loaded, x)[0]) == case["expected"]["default_probability"]
    with pytest.raises(Exception, match="has no version"):
        load_golden("42")


def test_a_service_serving_another_model_is_counted_once_per_request(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    """Another version's model answers with both a wrong version and wrong probabilities: two
    problems a request, which the summary subtracted from the count ("-20/20 matched")."""
    version = register(good_candidate)
    stage_as_retrain(version)
    features = good_candidate.split.feature_names
    with scoring_service(good_candidate.booster, features, "999", bias=0.01) as url:
        result = CliRunner().invoke(app, ["registry", "verify", "--stage", "staging", "--url", url])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[1].startswith("0/20 golden requests matched; "), result.output
    tags = client().get_model_version(MODEL_NAME, version).tags
    assert tags["staging_verification_detail"].startswith("0/20 golden requests matched; ")


def test_a_service_that_takes_requests_but_never_answers_is_given_up_on_after_one(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    """A port that accepts connections and never answers (a hung or still-loading service): each
    of the 20 golden requests waited its whole --timeout (200 s at the default), in silence."""
    import socket

    version = register(good_candidate)
    stage_as_retrain(version)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel completes connections; nobody reads or answers
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        started = time.monotonic()
        result = CliRunner().invoke(
            app,
            [
                "registry",
                "verify",
                "--version",
                version,
                "--url",
                url,
                "--timeout",
                "1",
                "--ready-timeout",
                "0",  # straight to the golden requests
            ],
        )
        elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert elapsed < 10, f"{elapsed:.0f} s: 20 requests x 1 s"
    assert "request 0: no answer from" in result.output, result.output
    assert "the other 19 were not sent" in result.output, result.output
    assert client().get_model_version(MODEL_NAME, version).tags["staging_verification"] == "failed"


PASSWORD = "s3cr/t@pw"
"""A password with characters a URL must percent-encode (as `s3cr%2Ft%40pw`)."""


def _shows_no_password(*texts: str) -> None:
    """Neither form of PASSWORD (as given, percent-encoded) is in any of `texts`."""
    for text in texts:
        assert PASSWORD not in text and "s3cr%2Ft%40pw" not in text, text


def test_verify_sends_the_credentials_of_its_url_and_never_shows_them(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    """A staging service behind a proxy's basic authentication, reached as
    `--url http://user:password@host:port`: urllib ignored the user:password (every request
    answered 401), and the URL, password and all, went to stdout, the version's tags and the
    audit history."""
    version = register(good_candidate)
    stage_as_retrain(version)
    features = good_candidate.split.feature_names
    with scoring_service(
        good_candidate.booster, features, version, basic_auth=f"ops:{PASSWORD}"
    ) as url:
        with_credentials = url.replace("http://", "http://ops:s3cr%2Ft%40pw@")
        result = CliRunner().invoke(
            app, ["registry", "verify", "--stage", "staging", "--url", with_credentials]
        )
    assert result.exit_code == 0, result.output
    assert f"v{version} against {url}: PASSED" in result.output
    tags = client().get_model_version(MODEL_NAME, version).tags
    assert tags["staging_verification"] == "passed" and tags["staging_verification_url"] == url
    entries = history.read(client(), version)
    _shows_no_password(result.output, json.dumps(tags), json.dumps([e.reason for e in entries]))


@pytest.mark.parametrize("ready_timeout", ["5", "0"])
@pytest.mark.parametrize(
    "credentials", ["", "ops:s3cr%2Ft%40pw@"], ids=["no-credentials", "wrong-password"]
)
def test_a_service_refusing_the_credentials_records_nothing(
    registry_home: Path,
    good_candidate: Any,
    register: Callable[..., str],
    credentials: str,
    ready_timeout: str,
) -> None:
    """A missing token or a wrong password was recorded as a failed verification of the model
    ("0/20 golden requests matched; request 0: HTTP 401"), replacing a passed one: promote then
    refused a model nothing was wrong with. The service answered nothing about the model."""
    version = register(good_candidate)
    stage_as_retrain(version)
    features = good_candidate.split.feature_names
    with scoring_service(good_candidate.booster, features, version, basic_auth="ops:other") as url:
        result = CliRunner().invoke(
            app,
            [
                "registry",
                "verify",
                "--version",
                version,
                "--ready-timeout",
                ready_timeout,
                "--url",
                url.replace("http://", f"http://{credentials}"),
            ],
        )
    assert result.exit_code == 1, result.output
    assert f"the service at {url} refused the credentials verify sent (HTTP 401" in result.output
    assert "nothing was verified or recorded" in result.output, result.output
    tags = client().get_model_version(MODEL_NAME, version).tags
    assert "staging_verification" not in tags
    assert "verify" not in [e.action for e in history.read(client(), version)]
    _shows_no_password(result.output)


def test_a_service_never_ready_behind_credentials_is_named_without_them(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    import socket

    version = register(good_candidate)
    stage_as_retrain(version)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(
        app,
        [
            "registry",
            "verify",
            "--version",
            version,
            "--url",
            f"http://ops:s3cr%2Ft%40pw@127.0.0.1:{port}",
            "--timeout",
            "1",
            "--ready-timeout",
            "1",
        ],
    )
    assert result.exit_code == 1
    assert f"the service at http://127.0.0.1:{port} was not ready" in result.output, result.output
    assert "refused" in result.output, "the real reason: nothing listens, not an unknown host"
    _shows_no_password(result.output)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["--url", "http://ops:pw-for-staging@127.0.0.1:1", "--token", "abc123"],
            "give the credentials in --url or --token, not both",
        ),
        (["--url", "127.0.0.1:3001"], "--url must be an http:// or https:// URL"),
        (["--url", "ftp://127.0.0.1:3001"], "--url must be an http:// or https:// URL"),
        (["--url", "http://127.0.0.1:port"], "--url is not a valid URL"),
    ],
)
def test_a_url_verify_cannot_use_is_refused_at_once_recording_nothing(
    registry_home: Path,
    good_candidate: Any,
    register: Callable[..., str],
    args: list[str],
    said: str,
) -> None:
    """A URL without scheme waited the whole --ready-timeout (60 s) before failing with urllib's
    "unknown url type"; --token beside a URL's password sent one of them silently."""
    version = register(good_candidate)
    stage_as_retrain(version)
    result = CliRunner().invoke(
        app, ["registry", "verify", "--version", version, "--ready-timeout", "30", *args]
    )
    assert result.exit_code == 1
    assert said in result.output, result.output
    assert "nothing was verified or recorded" in result.output, result.output
    assert "pw-for-staging" not in result.output
    tags = client().get_model_version(MODEL_NAME, version).tags
    assert "staging_verification" not in tags
    assert "verify" not in [e.action for e in history.read(client(), version)]
