"""The built bento served by `bentoml serve` on loopback, exercised over real HTTP, and the
service's code in this process. (The service started by registry stage: test_service_by_stage.py.)"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.bentos.serving import TOKEN, call, serving

MAX_BATCH = 5
pytestmark = pytest.mark.slow


def _free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def bento(serving_env: dict[str, str]) -> str:
    """paylater-scorer:<production version>, built once for the module's servers (a build locks
    the bento's packages with uv: seconds, and the same bento each time)."""
    from bentos.build import build_bento

    return build_bento(serving_env["production_version"])


@pytest.fixture(scope="module")
def served(
    serving_env: dict[str, str],
    bento: str,
    pg_server_url: str,
    fill_online_features: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SimpleNamespace]:
    """The production version's bento served with online features and a token."""
    import psycopg

    version = serving_env["production_version"]
    db = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    db_url = f"{pg_server_url.rpartition('/')[0]}/{db}"
    fill_online_features(db_url)
    env = {
        "PAYLATER_SOURCE_URL": db_url,
        "PAYLATER_API_TOKEN": TOKEN,
        "PAYLATER_SERVE_MAX_BATCH": str(MAX_BATCH),
    }
    log = tmp_path_factory.mktemp("bento") / "serve.log"
    try:
        with serving(
            bento, env, log, lambda base: call(base, "/readyz", token=None)[0] == 200
        ) as server:
            yield SimpleNamespace(
                base=server.base, pid=server.pid, version=version, bento=bento, log=log
            )
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def test_ready_and_serves_the_bento_model_version(served: SimpleNamespace) -> None:
    assert call(served.base, "/readyz", token=None)[0] == 200
    status, body = call(served.base, "/v2/score", {"user_id": 1, "amount_jpy": 20_000})
    assert status == 200, body
    assert body["model_version"] == served.version
    assert body["decision"] in ("approve", "decline")
    assert 0.0 < body["default_probability"] < 1.0
    assert isinstance(body["reason_codes"], list)
    assert call(served.base, "/model_info", {})[1]["model_version"] == served.version
    assert "PAYLATER_SERVE_STAGE=" not in served.log.read_text(), "a bento asks no registry"


def test_the_bento_installs_the_server_speedups_the_service_was_measured_with(
    served: SimpleNamespace,
) -> None:
    """A container built from the bento (`bentoml containerize`) installs only the bento's
    requirements: without httptools and uvloop uvicorn falls back to pure-Python h11 and asyncio,
    slower than the server the serving benchmark measured (which runs in this environment)."""
    import bentoml

    requirements = Path(bentoml.bentos.get(served.bento).path) / "env/python/requirements.txt"
    named = {
        re.split(r"[=<>~!\[; ]", line.strip(), maxsplit=1)[0].lower()
        for line in requirements.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "-"))
    }
    assert {"httptools", "uvloop"} <= named, sorted(named)


def test_v1_and_v2_agree(served: SimpleNamespace, catalog: SimpleNamespace) -> None:
    for user_id in catalog.users:
        for amount in (1_000, 30_000, 100_000):
            s2, v2 = call(served.base, "/v2/score", {"user_id": user_id, "amount_jpy": amount})
            s1, v1 = call(
                served.base, "/v1/score", {"customer_id": str(user_id), "requested_yen": amount}
            )
            assert (s1, s2) == (200, 200), (v1, v2)
            assert v1["risk_score"] == v2["default_probability"]
            assert v1["approved"] == (v2["decision"] == "approve")
            assert v1["reasons"] == v2["reason_codes"]
            assert v1["model_version"] == v2["model_version"]


def test_batch_equals_single_and_explicit_features_equal_lookup(
    served: SimpleNamespace, catalog: SimpleNamespace
) -> None:
    requests: list[dict[str, Any]] = [
        {"user_id": 1, "amount_jpy": 5_000},
        {"user_id": 2, "amount_jpy": 90_000},
        {"amount_jpy": 90_000, "features": catalog.users[2]},
        {"user_id": 3, "amount_jpy": 12_345},
    ]
    status, batch = call(served.base, "/v2/score_batch", requests)
    assert status == 200, batch
    singles = [call(served.base, "/v2/score", r)[1] for r in requests]
    assert batch == singles
    assert batch[1] == batch[2], "explicit features must score like the looked-up user"


BAD_INPUTS = [
    ("/v2/score", {"user_id": 1}, "amount_jpy"),
    ("/v2/score", {"user_id": 1, "amount_jpy": 5_000, "channel": "app"}, "channel"),
    ("/v2/score", {"user_id": 1, "amount_jpy": -5_000}, "amount_jpy"),
    ("/v2/score", {"user_id": 1, "amount_jpy": 10**12}, "amount_jpy"),
    ("/v2/score", {"user_id": 1, "amount_jpy": "5000"}, "amount_jpy"),
    ("/v2/score", {"user_id": "one", "amount_jpy": 5_000}, "user_id"),
    # Past bigint, no user can have it; the embedded SQLite source failed the lookup on it (503).
    ("/v2/score", {"user_id": 2**63, "amount_jpy": 5_000}, "user_id"),
    (
        "/v2/score_batch",
        [{"user_id": 1, "amount_jpy": 5_000}, {"user_id": 2**64, "amount_jpy": 5_000}],
        "[1].user_id",
    ),
    ("/v2/score", {"amount_jpy": 5_000}, "body"),
    ("/v2/score", {"user_id": 1, "amount_jpy": 5_000, "features": {}}, "body"),
    (
        "/v2/score",
        {"amount_jpy": 5_000, "features": {"days_since_signup": 1.0}},
        "features.topups_30d",
    ),
    (
        "/v2/score",
        {
            "amount_jpy": 5_000,
            "features": {
                "days_since_signup": 1.0,
                "topups_30d": 1.0,
                "card_spend_30d_jpy": 1.0,
                "late_repayments_365d": 0.0,
                "shoe_size": 1.0,
            },
        },
        "features.shoe_size",
    ),
    ("/v2/score_batch", [{"user_id": 1, "amount_jpy": 5_000}] * (MAX_BATCH + 1), "body"),
    (
        "/v2/score_batch",
        [{"user_id": 1, "amount_jpy": 5_000}, {"user_id": 1, "amount_jpy": 0}],
        "[1].amount_jpy",
    ),
    ("/v2/score_batch", {"user_id": 1, "amount_jpy": 5_000}, "body"),
    ("/v2/score_batch", [], "body"),
    ("/v1/score", {"customer_id": 1, "requested_yen": 5_000}, "customer_id"),
    ("/v1/score", {"customer_id": "1", "amount_jpy": 5_000}, "requested_yen"),
    # Decimal text the pattern allows but no user id can be (v2 requires user_id >= 1).
    ("/v1/score", {"customer_id": "0", "requested_yen": 5_000}, "customer_id"),
    ("/v1/score", {"customer_id": "000", "requested_yen": 5_000}, "customer_id"),
]
NON_FINITE = [
    (
        b'{"amount_jpy": 5000, "features": {"days_since_signup": NaN, "topups_30d": 1, "card_spend_30d_jpy": 1, "late_repayments_365d": 0}}',
        "features.days_since_signup",
    ),
    (
        b'{"amount_jpy": 5000, "features": {"days_since_signup": 1, "topups_30d": Infinity, "card_spend_30d_jpy": 1, "late_repayments_365d": 0}}',
        "features.topups_30d",
    ),
    (b'{"user_id": 1, "amount_jpy": 5000', "body"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD_INPUTS)
def test_bad_input_is_422_naming_the_field(
    served: SimpleNamespace, path: str, body: Any, field: str
) -> None:
    status, answer = call(served.base, path, body)
    assert status == 422, answer
    assert field in [f["field"] for f in answer["fields"]], answer


@pytest.mark.parametrize(("raw", "field"), NON_FINITE)
def test_non_finite_and_malformed_json_are_422(
    served: SimpleNamespace, raw: bytes, field: str
) -> None:
    status, answer = call(served.base, "/v2/score", raw=raw)
    assert status == 422, answer
    assert field in [f["field"] for f in answer["fields"]], answer


def test_unknown_user_is_404_naming_it(served: SimpleNamespace) -> None:
    status, answer = call(served.base, "/v2/score", {"user_id": 424242, "amount_jpy": 5_000})
    assert status == 404
    assert answer["error"] == "unknown_user" and answer["user_ids"] == [424242]
    status, answer = call(
        served.base,
        "/v2/score_batch",
        [{"user_id": 1, "amount_jpy": 5_000}, {"user_id": 77, "amount_jpy": 5_000}],
    )
    assert (status, answer["user_ids"]) == (404, [77])


def test_token_protects_scoring(served: SimpleNamespace) -> None:
    request = {"user_id": 1, "amount_jpy": 5_000}
    # The scheme is case-insensitive (RFC 7235); OAuth clients often send their token_type "bearer".
    for scheme in ("Bearer", "bearer", "BEARER"):
        sent = urllib.request.Request(
            served.base + "/v2/score",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"{scheme} {TOKEN}"},
        )
        with urllib.request.urlopen(sent, timeout=30) as answer:
            assert answer.status == 200, scheme
    assert call(served.base, "/v2/score", request, token=TOKEN.upper())[0] == 401
    assert call(served.base, "/v2/score", request, token=None)[0] == 401
    assert call(served.base, "/v2/score", request, token="wrong")[0] == 401
    assert call(served.base, "/v2/score_batch", [request], token=None)[0] == 401
    assert (
        call(served.base, "/v1/score", {"customer_id": "1", "requested_yen": 5_000}, token=None)[0]
        == 401
    )
    # The model's feature names and cutoff are no one else's business either; the probes and
    # Prometheus' scrape stay open.
    assert call(served.base, "/model_info", {}, token=None)[0] == 401
    assert call(served.base, "/model_info", {}, token="wrong")[0] == 401
    assert call(served.base, "/model_info", {})[0] == 200
    assert call(served.base, "/readyz", token=None)[0] == 200
    assert call(served.base, "/metrics", token=None)[0] == 200


def test_metrics_and_still_alive_after_bad_input(served: SimpleNamespace) -> None:
    call(served.base, "/v2/score", raw=b"\xff\xfe garbage")
    status, text = call(served.base, "/metrics", token=None)
    assert status == 200 and "request_total" in text
    assert 'endpoint="/v2/score"' in text, "the scoring routes must be counted"
    assert call(served.base, "/v2/score", {"user_id": 1, "amount_jpy": 5_000})[0] == 200
    assert "Traceback" not in served.log.read_text()


def test_the_bench_counts_each_keep_alive_connection_on_the_worker_holding_it(
    served: SimpleNamespace,
) -> None:
    """The serving bench's split of wrk's connections over the two workers: every open keep-alive
    connection is counted once, on a worker of this server, and closed ones no more."""
    from bench.bench_serving import connections_per_worker, settled_spread

    port = int(served.base.rsplit(":", 1)[1])
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
            for _ in range(16)
        ]
        for client in clients:  # answered, so accepted by a worker, and kept open
            client.sendall(b"GET /livez HTTP/1.1\r\nHost: scorer\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200"), "keep-alive /livez answered"
        counts = connections_per_worker(served.pid, port)
        assert len(counts) == 2 and sum(counts) == 16, counts
        assert settled_spread(served.pid, served.base, 16) == counts
        for client in clients[:6]:
            client.shutdown(socket.SHUT_RDWR)
            client.close()
        deadline = time.monotonic() + 10
        while sum(connections_per_worker(served.pid, port)) > 10 and time.monotonic() < deadline:
            time.sleep(0.02)  # the workers notice the closes when their loops next run
        assert sum(connections_per_worker(served.pid, port)) == 10


def test_a_stage_unresolved_at_start_is_resolved_later_once_for_every_worker(
    serving_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tracking server down when the service starts: every worker failed naming it, and the
    service never recovered without a restart. Now the workers ask again, and the first answer
    is pinned for all of them (in a file the parent made) so that a promotion in between, or a
    worker BentoML restarts later, cannot make two workers serve different versions."""
    from mlflow import MlflowClient

    from bentos import service

    first, second = serving_env["production_version"], serving_env["staging_version"]
    monkeypatch.setenv("PAYLATER_SERVE_STAGE", "production")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    environ = {service.RESOLVED_VERSION_ENV: "stale"}
    started = time.monotonic()
    service.pin_served_version(environ)
    assert time.monotonic() - started < 60
    assert service.RESOLVED_VERSION_ENV not in environ
    reason = environ[service.RESOLVE_ERROR_ENV]
    assert reason.startswith("PAYLATER_SERVE_STAGE=production could not be resolved"), reason
    assert "unreachable" in reason, reason
    pin = Path(environ[service.PIN_FILE_ENV])
    assert pin.read_text() == ""
    for key in (service.RESOLVE_ERROR_ENV, service.PIN_FILE_ENV):
        monkeypatch.setenv(key, environ[key])

    with pytest.raises(service.Unresolved) as still_down:  # a worker's attempt: still down
        service._load_scorer()
    lasting, said = service.load_failure(still_down.value)
    assert not lasting, said
    assert said.startswith(reason) and "asked again" in said, said
    assert "make the registry reachable" in said, said
    assert pin.read_text() == ""

    monkeypatch.setenv("MLFLOW_TRACKING_URI", serving_env["MLFLOW_TRACKING_URI"])  # back up
    assert service._load_scorer().model_version == first
    assert pin.read_text() == first
    client = MlflowClient(serving_env["MLFLOW_TRACKING_URI"])
    client.set_registered_model_alias("paylater-default", "production", second)
    try:  # the other worker, or one restarted after a promotion: the pinned version
        assert service._load_scorer().model_version == first
    finally:
        client.set_registered_model_alias("paylater-default", "production", first)

    # A parent that made no pin file: no worker may resolve on its own; a restart does.
    monkeypatch.delenv(service.PIN_FILE_ENV)
    with pytest.raises(service.Unresolved, match="restart the service") as unpinned:
        service._load_scorer()
    assert service.load_failure(unpinned.value)[0], "waiting cannot fix it"


def test_an_unresolved_stage_without_a_writable_temporary_directory_still_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No pin file can be made (a read-only root file system): `bentoml serve` must still start,
    and its workers then say to restart it rather than resolve the stage each on its own."""
    import tempfile

    from bentos import service

    def unanswered(stage: str) -> str:
        raise TimeoutError("no answer in 120 s")

    monkeypatch.setattr(service, "_resolve_in_child", unanswered)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "absent"))
    environ: dict[str, str] = {}
    service.pin_served_version(environ)
    assert service.PIN_FILE_ENV not in environ
    assert "no answer in 120 s" in environ[service.RESOLVE_ERROR_ENV]
    assert "restart the service to try again" in caplog.text
    monkeypatch.setenv(service.RESOLVE_ERROR_ENV, environ[service.RESOLVE_ERROR_ENV])
    monkeypatch.delenv(service.PIN_FILE_ENV, raising=False)
    with pytest.raises(service.Unresolved, match="restart the service to resolve it again"):
        service._load_scorer()


def test_a_request_waiting_on_a_first_load_gets_its_503_before_the_request_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first load still under way (a slow model store): the request waits for it, but answers
    503 naming why before BentoML's own request timeout would cut it off with no reason (the wait
    was 60 s against a 30 s timeout)."""
    import asyncio

    from bentos import service

    assert service.LOAD_WAIT_SECONDS < service.REQUEST_TIMEOUT_SECONDS
    monkeypatch.setattr(service, "LOAD_WAIT_SECONDS", 0.2)
    engine = service.Engine()
    started = time.monotonic()
    with pytest.raises(service.Reply) as reply:
        asyncio.run(engine.loaded_scorer())
    assert time.monotonic() - started >= 0.2  # it waited for the load first
    assert reply.value.status == 503 and reply.value.body["detail"] == "model is loading"


def test_load_retries_back_off_to_the_cap_and_lasting_failures_wait_the_cap() -> None:
    from bentos.service import retry_delay

    assert [retry_delay(n, False, 60.0) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert retry_delay(10_000, False, 60.0) == 60.0
    assert [retry_delay(n, False, 5.0) for n in range(1, 5)] == [1, 2, 4, 5]
    assert retry_delay(1, True, 60.0) == 60.0


def test_a_load_failure_says_whether_waiting_heals_it_and_what_to_fix() -> None:
    """Out of reach or timed out: waiting heals it. The registry or store lacking the version, a
    file that is no model, a model this code cannot serve: the reason says what to fix."""
    from bentoml.exceptions import NotFound
    from lightgbm.basic import LightGBMError
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    from bentos.service import load_failure
    from registry.store import RegistryError

    for passing in (
        RegistryError("MLflow tracking server http://mlflow:5000 is unreachable (refused)"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("no answer"),
        MlflowException("API request failed: 503", error_code=TEMPORARILY_UNAVAILABLE),
    ):
        lasting, reason = load_failure(passing)
        assert not lasting, passing
        assert reason == " ".join(str(passing).split()), reason
    absent = MlflowException(
        "Model Version (name=paylater-default, version=999) not found",
        error_code=RESOURCE_DOES_NOT_EXIST,
    )
    for lasting_failure, fix in (
        (absent, "paylater registry list"),
        (NotFound("paylater-default:7 not found in the model store"), "model store lacks it"),
        (
            LightGBMError("Model file doesn't specify the number of classes"),
            "paylater bento import",
        ),
        (ValueError("feature_names do not match the model's features"), "serve another version"),
    ):
        lasting, reason = load_failure(lasting_failure)
        assert lasting, lasting_failure
        assert str(lasting_failure) in reason and fix in reason, reason
    wrapped = RuntimeError("loading failed")
    wrapped.__cause__ = absent
    assert load_failure(wrapped)[0], "the cause decides"


def test_a_source_of_another_kind_is_logged_without_its_password(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The service log names the unsupported source, never its password."""
    from bentos.service import _feature_store

    monkeypatch.setenv("PAYLATER_SOURCE_URL", "mysql://app:Wr0ngSecret@db.internal/ops")
    assert _feature_store(["f"]) is None
    assert "mysql://app:***@db.internal/ops" in caplog.text
    assert "Wr0ngSecret" not in caplog.text


def publish(db_url: str, users: dict[int, dict[str, float | None]], columns: list[str]) -> None:
    """Publish `columns` of `users` to the online table with the real publisher (tasks.online)."""
    import datetime

    import pyarrow as pa

    from tasks.online import publish_user_features

    ids = sorted(users)
    data: dict[str, Any] = {
        "user_id": pa.array(ids, pa.int64()),
        "as_of": pa.array([datetime.date(2026, 11, 26)] * len(ids), pa.date32()),
    }
    for name in columns:
        data[name] = pa.array([users[u].get(name) for u in ids], pa.float64())
    assert publish_user_features(pa.table(data), source_url=db_url) == len(ids)


def test_an_online_table_without_a_model_column_is_not_ready_naming_it_and_recovers(
    bento: str,
    pg_url: str,
    catalog: SimpleNamespace,
    tmp_path: Path,
) -> None:
    """The online table republished without a column the model needs (or by a feature build for
    another model): /readyz said ready while every user_id score failed, and an unknown user was
    answered 404 as if the table were fine. Now /readyz and the scoring routes answer 503 naming
    the table and the missing columns, from startup on, and the service recovers by itself once
    the table fits. A republish that only adds columns keeps scoring (a lookup prepared before it
    failed with "cached plan must not change result type")."""
    users, needed = catalog.users, catalog.user_features
    lacking = [c for c in needed if c != "late_repayments_365d"]
    publish(pg_url, users, lacking)
    env = {"PAYLATER_SOURCE_URL": pg_url, "PAYLATER_API_TOKEN": ""}
    log = tmp_path / "serve.log"
    known, stranger = {"user_id": 1, "amount_jpy": 5_000}, {"user_id": 424242, "amount_jpy": 5_000}

    def readyz_names(column: str) -> Callable[[str], bool]:
        def check(base: str) -> bool:
            status, text = call(base, "/readyz", token=None)
            return status == 503 and column in str(text) and "user_features_latest" in str(text)

        return check

    def settled(base: str, check: Callable[[str], bool]) -> None:
        """Wait until `check` holds 10 times in a row (each worker answers for itself)."""
        deadline, in_a_row = time.monotonic() + 60, 0
        while in_a_row < 10:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            in_a_row = in_a_row + 1 if check(base) else 0
            time.sleep(0.05 if in_a_row else 0.1)

    with serving(bento, env, log, readyz_names("late_repayments_365d")) as server:
        base = server.base
        for _ in range(6):
            for body in (known, stranger):
                status, answer = call(base, "/v2/score", body, token=None)
                assert status == 503, answer
                assert answer["error"] == "feature_table_mismatch", answer
                assert "late_repayments_365d" in answer["detail"], answer
                assert "user_features_latest" in answer["detail"], answer
            explicit = {"amount_jpy": 5_000, "features": users[1]}
            assert call(base, "/v2/score", explicit, token=None)[0] == 200

        publish(pg_url, users, needed)
        settled(base, lambda b: call(b, "/readyz", token=None)[0] == 200)
        for _ in range(20):  # past psycopg's prepare threshold on both workers
            assert call(base, "/v2/score", known, token=None)[0] == 200

        extra = {u: {**f, "another_models_feature": 1.0} for u, f in users.items()}
        publish(pg_url, extra, [*needed, "another_models_feature"])
        for _ in range(20):
            status, answer = call(base, "/v2/score", known, token=None)
            assert status == 200, answer
        assert call(base, "/v2/score", stranger, token=None)[0] == 404

        publish(pg_url, users, [c for c in needed if c != "card_spend_30d_jpy"])
        settled(base, readyz_names("card_spend_30d_jpy"))
        status, answer = call(base, "/v2/score", known, token=None)
        assert (status, answer["error"]) == (503, "feature_table_mismatch"), answer
        assert "card_spend_30d_jpy" in answer["detail"], answer
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
