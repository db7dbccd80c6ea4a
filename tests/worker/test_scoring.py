"""The HTTP backend against the bento's real /v2 routes (served by uvicorn on a free port)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from worker import queue
from worker.runner import Worker, WorkerConfig
from worker.scoring import (
    BackendUnavailable,
    HttpBackend,
    InvalidRequest,
    Outcome,
    ScoreOutcome,
    ScoreRequest,
)


@contextmanager
def serving(app: Any, kit: Any) -> Iterator[str]:
    """An ASGI app served by uvicorn on a free loopback port; its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    kit.wait_until(lambda: server.started, 10, "uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)  # the feature connection dies with the test database


@pytest.fixture
def engine(queue_db: str, booster: Any, kit: Any) -> Iterator[Any]:
    """bentos.service's ENGINE with the test model and feature store (restored afterwards)."""
    from bentos.scoring import CoalescingFeatureStore
    from bentos.service import ENGINE

    scorer = kit.make_scorer(booster, "7")
    saved = (ENGINE.scorer, ENGINE.features, ENGINE.max_batch, ENGINE.token)
    features = CoalescingFeatureStore(queue_db, scorer.user_feature_names)
    ENGINE.scorer, ENGINE.features = scorer, features
    ENGINE.max_batch, ENGINE.token = 1000, None
    try:
        yield ENGINE
    finally:
        ENGINE.scorer, ENGINE.features, ENGINE.max_batch, ENGINE.token = saved


@pytest.fixture
def bento_v2(engine: Any, kit: Any) -> Iterator[str]:
    """bentos.service's /v2 ASGI routes with the test model and feature store, over real HTTP."""
    from bentos.service import V2

    with serving(V2, kit) as url:
        yield url


def test_http_backend_scores_like_in_process_and_fails_unknown_users_alone(
    queue_db: str, bento_v2: str, booster: Any, kit: Any
) -> None:
    """Known users are scored as the Scorer would; an unknown one becomes that request's error."""
    from bentos.scoring import FeatureStore

    scorer = kit.make_scorer(booster, "7")
    requests = [ScoreRequest(i, u, 5_000 + 700 * i) for i, u in enumerate([3, 999_999, 8, 3])]
    backend = HttpBackend(bento_v2, max_batch=2)  # two calls: the chunking path too
    outcomes = backend.score(requests)
    assert isinstance(outcomes[1], InvalidRequest) and "unknown user_id 999999" in str(outcomes[1])
    features = FeatureStore(queue_db, scorer.user_feature_names).get([3, 8])
    for request, outcome in zip(requests, outcomes, strict=True):
        if request.user_id == 999_999:
            continue
        [expected] = scorer.score_rows(
            [scorer.request_row(request.amount_jpy, features[request.user_id])]
        )
        assert isinstance(outcome, ScoreOutcome), outcome
        assert outcome.default_probability == pytest.approx(expected.default_probability)
        assert (outcome.decision, outcome.model_version) == (expected.decision, "7")
    assert backend.model_version == "7"
    backend.close()


def test_worker_over_http_and_an_unreachable_service_retries(
    queue_db: str, bento_v2: str, kit: Any
) -> None:
    """The worker scores through the bento; with the bento gone, jobs back off instead of failing."""
    kit.enqueue_many(queue_db, 20)
    config = WorkerConfig(batch_size=50, concurrency=1, backoff_seconds=60)
    worker = Worker(queue_db, HttpBackend(bento_v2), config)
    with queue.connect(queue_db) as conn:
        assert worker.run_once(conn) == 20
    assert kit.query(
        queue_db, "SELECT count(*) FROM scoring_results WHERE model_version = '7'"
    ) == [(20,)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}"
    unreachable = HttpBackend(dead_url)
    with pytest.raises(BackendUnavailable):
        unreachable.score([ScoreRequest(1, 1, 5_000)])
    [job_id] = kit.enqueue_many(queue_db, 1)
    started = time.monotonic()
    with queue.connect(queue_db) as conn:
        assert Worker(queue_db, unreachable, config).run_once(conn) == 1
    assert time.monotonic() - started < 5
    [(status, error)] = kit.query(
        queue_db, "SELECT status, error FROM scoring_jobs WHERE id = %s", (job_id,)
    )
    assert status == "queued" and "unreachable" in error


def scored(outcomes: list[Outcome]) -> list[ScoreOutcome]:
    """`outcomes`, each asserted to be a score (every user of the sample is known)."""
    for outcome in outcomes:
        assert isinstance(outcome, ScoreOutcome), outcome
    return [o for o in outcomes if isinstance(o, ScoreOutcome)]


def test_declines_mode_matches_all_mode_except_approvals_reasons(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """'declines' gives the same probabilities and decisions, and the same reasons on declines."""
    from worker.scoring import InProcessBackend

    scorer = kit.make_scorer(booster, "7")
    requests = [
        ScoreRequest(i, 1 + i % kit.n_users, amount)
        for i, amount in enumerate(range(1_000, 100_001, 1_650))
    ]
    full = scored(InProcessBackend(scorer, queue_db, "all").score(requests))
    lean = scored(InProcessBackend(scorer, queue_db, "declines").score(requests))
    decisions = {o.decision for o in full}
    assert decisions == {"approve", "decline"}, "the sample must exercise both decisions"
    for a, b in zip(full, lean, strict=True):
        assert b.default_probability == pytest.approx(a.default_probability, abs=1e-12)
        assert b.decision == a.decision
        assert b.reason_codes == (a.reason_codes if a.decision == "decline" else [])
    with pytest.raises(ValueError, match="reason_codes must be one of"):
        InProcessBackend(scorer, queue_db, "some")


def test_a_scoring_url_without_the_routes_holds_jobs_instead_of_dead_lettering(
    queue_db: str, bento_v2: str, kit: Any
) -> None:
    """A URL with a wrong path (here /v2 twice) answers 404 not_found to every call: a deployment
    mistake, not any job's fault, so the jobs wait queued with no attempt spent and the error
    naming the route; before, the batch was split down to single jobs and each dead-lettered."""
    ids = kit.enqueue_many(queue_db, 4)
    config = WorkerConfig(batch_size=10, concurrency=1, max_attempts=1)
    worker = Worker(queue_db, HttpBackend(f"{bento_v2}/v2"), config)
    with queue.connect(queue_db) as conn:
        assert worker.run_once(conn) == 4
    rows = kit.query(
        queue_db, "SELECT status, attempts, error FROM scoring_jobs WHERE id = ANY(%s)", (ids,)
    )
    assert {(status, attempts) for status, attempts, _ in rows} == {("queued", 0)}
    assert all("404" in error and "/v2/v2/score_batch" in error for _, _, error in rows)


def test_jobs_held_for_an_unreachable_service_are_not_counted_as_failed_attempts(
    queue_db: str, kit: Any
) -> None:
    """Held jobs spend no attempt, and the runbook says they are not failed attempts: counted as
    failed{reason="error"}, every poll of a backlog during an outage fed the failure-rate alerts
    (100 % for its length) and the retried total. They are counted as held instead."""
    from prometheus_client import generate_latest

    from worker.metrics import WorkerMetrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}"
    kit.enqueue_many(queue_db, 3)
    metrics = WorkerMetrics()
    config = WorkerConfig(batch_size=10, concurrency=1, backoff_seconds=0)
    worker = Worker(queue_db, HttpBackend(dead_url), config, metrics=metrics)
    with queue.connect(queue_db) as conn:
        assert worker.run_once(conn) == 3
        assert worker.run_once(conn) == 3  # claimed again at once: no backoff configured
    exported = generate_latest(metrics.registry).decode()
    assert 'paylater_worker_jobs_failed_total{reason="error"} 0.0' in exported
    assert "paylater_worker_jobs_held_total 6.0" in exported
    assert (worker.totals.retried, worker.totals.held) == (0, 6)


def test_a_service_at_its_concurrency_limit_holds_jobs_instead_of_dead_lettering(
    queue_db: str, engine: Any, kit: Any
) -> None:
    """BentoML answers 429 past traffic.max_concurrency (so may a gateway): the worker split the
    batch down to single jobs, each 429 again, each spending an attempt, and an overloaded
    service dead-lettered the queue. An overload is nobody's fault: jobs wait, no attempt spent."""
    from bentoml._internal.server.http.traffic import MaxConcurrencyMiddleware

    from bentos.service import V2

    ids = kit.enqueue_many(queue_db, 4)
    config = WorkerConfig(batch_size=10, concurrency=1, max_attempts=1)
    # No slot free: the state of a service whose every slot other callers hold.
    busy = MaxConcurrencyMiddleware(V2, max_concurrency=0)
    with serving(busy, kit) as url, queue.connect(queue_db) as conn:
        assert Worker(queue_db, HttpBackend(url), config).run_once(conn) == 4
    rows = kit.query(
        queue_db, "SELECT status, attempts, error FROM scoring_jobs WHERE id = ANY(%s)", (ids,)
    )
    assert {(status, attempts) for status, attempts, _ in rows} == {("queued", 0)}
    assert all("429" in error for _, _, error in rows)


def test_a_504_from_the_service_searches_the_batch_for_the_request_it_hangs_on(
    queue_db: str, engine: Any, kit: Any
) -> None:
    """BentoML's own traffic timeout answers 504 for a request it gave up on: no answer in time,
    as the client's timeout. It was taken for an outage, so a job the service hangs on held its
    batch-mates queued forever; now the halves are tried, the batch-mates are scored and the job
    it hangs on alone spends its attempt."""
    import asyncio

    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from bentos.service import V2

    ids = kit.enqueue_many(queue_db, 8)  # users 2..9: the service hangs on user 5
    [(stuck_id,)] = kit.query(queue_db, "SELECT id FROM scoring_jobs WHERE user_id = 5")

    async def hangs_on_user_5(scope: Any, receive: Any, send: Any) -> None:
        """V2, stuck (past the traffic timeout) on any batch holding user 5."""
        message = await receive()
        if scope["type"] == "http" and b'"user_id":5,' in message.get("body", b""):
            await asyncio.sleep(30)

        async def replay() -> Any:
            return message

        await V2(scope, replay, send)

    config = WorkerConfig(batch_size=10, concurrency=1, max_attempts=1, lease_seconds=60)
    timed = TimeoutMiddleware(hangs_on_user_5, timeout=0.3)
    with serving(timed, kit) as url, queue.connect(queue_db) as conn:
        assert Worker(queue_db, HttpBackend(url), config).run_once(conn) == 8
    rows = dict(kit.query(queue_db, "SELECT id, status FROM scoring_jobs"))
    assert rows == {i: "dead" if i == stuck_id else "done" for i in ids}


def test_a_token_with_a_trailing_newline_scores_instead_of_dead_lettering(
    queue_db: str, engine: Any, kit: Any
) -> None:
    """PAYLATER_API_TOKEN from a secret file ends in a newline, which no header may carry: httpx
    refused every call with LocalProtocolError, taken for a request's fault, and every job was
    split down, retried and dead-lettered. The token is stripped as the service strips it."""
    from bentos.service import V2

    ids = kit.enqueue_many(queue_db, 3)
    engine.token = b"s3cret"
    config = WorkerConfig(batch_size=10, concurrency=1, max_attempts=1)
    with serving(V2, kit) as url, queue.connect(queue_db) as conn:
        backend = HttpBackend(url, token="s3cret\n")
        assert Worker(queue_db, backend, config).run_once(conn) == 3
        # A token no header can carry even stripped: the worker's configuration, jobs held.
        with pytest.raises(BackendUnavailable, match="cannot call"):
            HttpBackend(url, token="s3c\nret").score([ScoreRequest(1, 3, 5_000)])
    rows = kit.query(queue_db, "SELECT status FROM scoring_jobs WHERE id = ANY(%s)", (ids,))
    assert rows == [("done",)] * 3


def test_a_service_failing_every_request_holds_jobs_instead_of_dead_lettering_them(
    queue_db: str, engine: Any, kit: Any
) -> None:
    """A service answering 500 to every call (a bad deploy): each batch was split down to single
    jobs (about 2n calls), each spent an attempt, and within a few backoffs the whole queue was
    dead-lettered. When the request it answered last (another user's) now fails too, the fault
    is the service's: jobs are held, no attempt spent, and scored once it answers again."""
    from bentos.service import V2

    broken = {"now": False}

    async def sometimes_broken(scope: Any, receive: Any, send: Any) -> None:
        """V2, or a 500 to every call while broken (as the routes answer an internal error)."""
        if not broken["now"] or scope["type"] != "http":
            await V2(scope, receive, send)
            return
        body = b'{"error":"internal","detail":"internal error, logged"}'
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    config = WorkerConfig(batch_size=10, concurrency=1, max_attempts=1, backoff_seconds=0)
    with serving(sometimes_broken, kit) as url, queue.connect(queue_db) as conn:
        worker = Worker(queue_db, HttpBackend(url), config)
        first = [queue.enqueue(conn, user, 5_000)[0] for user in (30, 31)]
        assert worker.run_once(conn) == 2  # answered: user 30's request is the reference
        broken["now"] = True
        later = kit.enqueue_many(queue_db, 4)  # users 2..5
        assert worker.run_once(conn) == 4
        rows = kit.query(
            queue_db,
            "SELECT status, attempts, error FROM scoring_jobs WHERE id = ANY(%s)",
            (later,),
        )
        assert {(status, attempts) for status, attempts, _ in rows} == {("queued", 0)}
        assert all("fails every request" in error for _, _, error in rows)
        broken["now"] = False
        assert worker.run_once(conn) == 4
    rows = kit.query(
        queue_db, "SELECT status FROM scoring_jobs WHERE id = ANY(%s)", (first + later,)
    )
    assert rows == [("done",)] * 6


def test_an_unusable_score_from_the_service_fails_its_jobs_with_the_reason(
    queue_db: str, engine: Any, kit: Any
) -> None:
    """A service answering a decision the results table does not allow (a newer service's
    'review', say) made the batch's write fail: the loop reconnected, every job of the batch
    stayed running until its lease ran out, and was dead-lettered as 'lease expired' at last.
    Such an answer is now refused when it arrives: the jobs fail their attempt saying why."""
    import json

    from bentos.service import V2

    async def says_review(scope: Any, receive: Any, send: Any) -> None:
        """V2, with every decision rewritten to 'review'."""

        async def rewrite(message: Any) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                items = json.loads(message["body"])
                for item in items:
                    item["decision"] = "review"
                message = {**message, "body": json.dumps(items).encode()}
            elif message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [h for h in message["headers"] if h[0] != b"content-length"],
                }
            await send(message)

        await V2(scope, receive, rewrite)

    ids = kit.enqueue_many(queue_db, 2)
    config = WorkerConfig(batch_size=10, concurrency=1, max_attempts=1)
    with serving(says_review, kit) as url, queue.connect(queue_db) as conn:
        assert Worker(queue_db, HttpBackend(url), config).run_once(conn) == 2
    rows = kit.query(queue_db, "SELECT status, error FROM scoring_jobs WHERE id = ANY(%s)", (ids,))
    assert [status for status, _ in rows] == ["dead", "dead"]
    assert all("decision 'review'" in error for _, error in rows)


def test_in_process_features_are_read_from_the_configured_online_table(pg_url: str) -> None:
    """The in-process worker reads the table the feature build publishes to
    (PAYLATER_ONLINE_FEATURES_TABLE), not always user_features_latest."""
    from datetime import date

    import pyarrow as pa

    from paylater.settings import Settings
    from tasks.online import publish_user_features
    from worker.scoring import OnlineFeatures

    rows = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int64()),
            "as_of": pa.array([date(2026, 11, 26)] * 2, pa.date32()),
            "topups_30d": pa.array([4.0, None], pa.float64()),
        }
    )
    publish_user_features(rows, pg_url, Settings(online_features_table="risk_features"))
    features = OnlineFeatures(pg_url, ["topups_30d"], "risk_features")
    try:
        index, matrix = features.lookup([2, 1, 3])
    finally:
        features.close()
    assert sorted(index) == [1, 2]
    assert matrix[index[1]].tolist() == [4.0]
    assert matrix[index[2]].tolist()[0] != matrix[index[2]].tolist()[0]  # NULL is NaN


def test_a_scoring_url_with_credentials_is_never_shown_in_its_errors() -> None:
    """httpx sends a URL's user:password as basic authentication; the error a job keeps and the
    worker logs names the service, not the password."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://bento:Wr0ngSecret@127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(BackendUnavailable, match=r"bento:\*\*\*@127\.0\.0\.1:\d+ unreachable") as e:
        HttpBackend(dead_url).score([ScoreRequest(1, 1, 5_000)])
    assert "Wr0ngSecret" not in str(e.value)


def test_a_service_whose_online_table_lacks_a_model_column_holds_jobs_naming_it(
    queue_db: str, bento_v2: str, kit: Any
) -> None:
    """The worker over HTTP, the service's online table republished without a model column: a
    batch of users with no row was answered 404 and its jobs failed as unknown users, as if the
    table were fine (and other batches got a generic feature_store_unavailable). Now every job
    waits queued, no attempt spent, its error naming the mismatch, the table and the column,
    and is scored once the table fits."""
    with queue.connect(queue_db) as conn:
        conn.execute("ALTER TABLE user_features_latest RENAME COLUMN late_ratio_180d TO old_name")
        conn.execute(
            "INSERT INTO scoring_jobs (user_id, payload) VALUES (999999, '{\"amount_jpy\": 5000}')"
        )
    config = WorkerConfig(batch_size=10, concurrency=1, max_attempts=1, backoff_seconds=0)
    worker = Worker(queue_db, HttpBackend(bento_v2), config)
    with queue.connect(queue_db) as conn:
        assert worker.run_once(conn) == 1  # a batch of an unknown user alone
        kit.enqueue_many(queue_db, 3)
        assert worker.run_once(conn) == 4
    rows = kit.query(queue_db, "SELECT status, attempts, error FROM scoring_jobs ORDER BY id")
    assert {(status, attempts) for status, attempts, _ in rows} == {("queued", 0)}, rows
    for _, _, error in rows:
        assert "feature_table_mismatch" in error and "late_ratio_180d" in error, error
        assert "user_features_latest" in error, error
    with queue.connect(queue_db) as conn:
        conn.execute("ALTER TABLE user_features_latest RENAME COLUMN old_name TO late_ratio_180d")
        assert worker.run_once(conn) == 4
    rows = kit.query(queue_db, "SELECT status FROM scoring_jobs ORDER BY id")
    assert rows == [("failed",)] + [("done",)] * 3, rows


def test_an_online_table_lacking_several_model_columns_names_them_all(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """PostgreSQL's error names only the first column a query lacks: an operator fixing the
    publish learnt of the next missing column only after the next deploy. The held jobs' error
    names every missing column, as the service's 503 does."""
    from worker.scoring import InProcessBackend

    with queue.connect(queue_db) as conn:
        conn.execute("ALTER TABLE user_features_latest DROP COLUMN topup_count_90d")
        conn.execute("ALTER TABLE user_features_latest DROP COLUMN late_ratio_180d")
    backend = InProcessBackend(kit.make_scorer(booster, "7"), queue_db)
    with pytest.raises(BackendUnavailable) as raised:
        backend.score([ScoreRequest(1, 1, 5_000)])
    backend.close()
    assert "topup_count_90d" in str(raised.value) and "late_ratio_180d" in str(raised.value)
    assert "user_features_latest" in str(raised.value)


def test_a_feature_database_restart_between_batches_holds_no_job(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """After a database restart the in-process worker's next lookup failed on its dead feature
    connection: the whole batch was held (BackendUnavailable, "feature database unreachable"),
    waiting out its backoff, though the database was back. The lookup is asked once more on a new
    connection, so the batch is scored on its first claim."""
    from worker.scoring import InProcessBackend

    backend = InProcessBackend(kit.make_scorer(booster, "7"), queue_db)
    worker = Worker(queue_db, backend, WorkerConfig(batch_size=10, concurrency=1))
    kit.enqueue_many(queue_db, 3)
    with queue.connect(queue_db) as conn:
        assert worker.run_once(conn) == 3
        db = queue_db.rpartition("/")[2]
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            [db],
        )
        kit.enqueue_many(queue_db, 3)
        assert worker.run_once(conn) == 3
    backend.close()
    rows = kit.query(queue_db, "SELECT status, attempts, count(*) FROM scoring_jobs GROUP BY 1, 2")
    assert rows == [("done", 1, 6)], rows
