"""The worker loop in this process on real PostgreSQL with the real Scorer and a tiny LightGBM model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest

from worker import queue
from worker.metrics import QueueCollector, WorkerMetrics
from worker.runner import HUNG, Worker, WorkerConfig
from worker.scoring import InProcessBackend, Outcome, ScoreOutcome, ScoreRequest

QUICK_SHUTDOWN = {"poll_interval": 0.05}
"""serve_forever's default 0.5 s poll made every server's shutdown() wait up to 0.5 s."""

FAST = WorkerConfig(batch_size=50, concurrency=2, lease_seconds=30, poll_seconds=0.2)


def backend_for(url: str, scorer: Any) -> InProcessBackend:
    """The in-process backend: the serving Scorer fed from user_features_latest."""
    return InProcessBackend(scorer, url)


def test_batch_scores_match_the_scorer(queue_db: str, booster: Any, kit: Any) -> None:
    """One run_once scores every job exactly as the service would (Scorer.score_rows on rows
    built by the serving FeatureStore and Scorer.request_row), in one batch."""
    from bentos.scoring import FeatureStore

    scorer = kit.make_scorer(booster, "7")
    ids = kit.enqueue_many(queue_db, 30)
    metrics = WorkerMetrics()
    worker = Worker(queue_db, backend_for(queue_db, scorer), FAST, metrics=metrics)
    with queue.connect(queue_db) as conn:
        assert worker.run_once(conn) == 30
        assert worker.run_once(conn) == 0
    rows = kit.query(
        queue_db,
        """SELECT j.user_id, (j.payload->>'amount_jpy')::int, r.probability, r.decision,
                  r.model_version, r.reason_codes, j.status, j.attempts
           FROM scoring_jobs j JOIN scoring_results r ON r.job_id = j.id ORDER BY j.id""",
    )
    assert len(rows) == len(ids)
    features = FeatureStore(queue_db, scorer.user_feature_names).get([r[0] for r in rows])
    expected = scorer.score_rows([scorer.request_row(r[1], features[r[0]]) for r in rows])
    for row, score in zip(rows, expected, strict=True):
        assert row[2] == pytest.approx(score.default_probability, abs=1e-12)
        assert row[3:6] == (score.decision, "7", score.reason_codes)
        assert row[6:] == ("done", 1)
    assert metrics.registry.get_sample_value("paylater_worker_jobs_processed_total") == 30
    assert metrics.registry.get_sample_value("paylater_worker_job_latency_seconds_count") == 30


def test_malformed_payloads_fail_their_job_and_the_worker_goes_on(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """Each bad request fails alone with a specific error; good jobs in the same batch are scored."""
    bad = {
        "no amount": (1, {"amount": 5000}, "payload lacks amount_jpy"),
        "text amount": (1, {"amount_jpy": "5000"}, "must be an integer number of yen, got str"),
        "fractional": (1, {"amount_jpy": 5000.5}, "got float"),
        "boolean": (1, {"amount_jpy": True}, "got bool"),
        "absurd": (1, {"amount_jpy": 10**12}, "outside the product's limits 1000..100000"),
        "not an object": (1, [5000], "must be a JSON object"),
        "unknown user": (999_999, {"amount_jpy": 5000}, "unknown user_id 999999"),
        # What `paylater enqueue` refuses, inserted by an app with SQL (the main path).
        "zero user": (0, {"amount_jpy": 5000}, "user_id must be a positive integer, got 0"),
        "negative user": (-7, {"amount_jpy": 5000}, "user_id must be a positive integer, got -7"),
        "largest user": (2**63 - 1, {"amount_jpy": 5000}, f"unknown user_id {2**63 - 1}"),
        "zero amount": (1, {"amount_jpy": 0}, "outside the product's limits 1000..100000"),
        "negative amount": (1, {"amount_jpy": -5000}, "outside the product's limits"),
        "past bigint": (1, {"amount_jpy": 10**30}, "outside the product's limits"),
    }
    from psycopg.types.json import Jsonb

    with queue.connect(queue_db) as conn:
        for key, (user_id, payload, _) in bad.items():
            conn.execute(
                "INSERT INTO scoring_jobs (idempotency_key, user_id, payload) VALUES (%s, %s, %s)",
                (key, user_id, Jsonb(payload)),
            )
    good = kit.enqueue_many(queue_db, 5)
    worker = Worker(queue_db, backend_for(queue_db, kit.make_scorer(booster, "7")), FAST)
    with kit.running(worker):
        kit.wait_until(
            lambda: (
                kit.query(
                    queue_db,
                    "SELECT count(*) FROM scoring_jobs WHERE status IN ('queued','running')",
                )[0][0]
                == 0
            ),
            10,
            "every job to finish",
        )
        later = kit.enqueue_many(queue_db, 1)  # still alive and scoring
        kit.wait_until(
            lambda: (
                kit.query(
                    queue_db, "SELECT count(*) FROM scoring_results WHERE job_id = %s", (later[0],)
                )[0][0]
                == 1
            ),
            10,
            "a job enqueued after the bad ones",
        )
    rows = dict(
        ((key, (status, attempts, error)))
        for key, status, attempts, error in kit.query(
            queue_db,
            "SELECT idempotency_key, status, attempts, error FROM scoring_jobs WHERE idempotency_key IS NOT NULL",
        )
    )
    for key, (_, _, message) in bad.items():
        status, attempts, error = rows[key]
        assert (status, attempts) == ("failed", 1), key
        assert error.startswith("invalid request: ") and message in error, (key, error)
    done = kit.query(
        queue_db, "SELECT count(*) FROM scoring_results WHERE job_id = ANY(%s)", (good,)
    )
    assert done == [(5,)]
    assert worker.totals.failed == len(bad)


class FailsOnUser:
    """A real backend whose model crashes on one user's rows (a poison job)."""

    def __init__(self, inner: InProcessBackend, poison_user: int) -> None:
        self.inner = inner
        self.poison_user = poison_user
        self.model_version = inner.model_version
        self.calls = 0

    def score(self, requests: Sequence[ScoreRequest]) -> list[Outcome]:
        """Raise like a model blowing up when the poison user is in the batch."""
        self.calls += 1
        if any(r.user_id == self.poison_user for r in requests):
            raise FloatingPointError(f"model crashed on user {self.poison_user}")
        return self.inner.score(requests)

    def close(self) -> None:
        """Close the inner backend."""
        self.inner.close()


def test_poison_job_is_dead_lettered_after_max_attempts(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """The crashing job alone retries with backoff and dies with its error; its batch-mates are scored."""
    ids = kit.enqueue_many(queue_db, 40)  # users 2..40 then 1: user 1 is the poison
    [(poison_id,)] = kit.query(queue_db, "SELECT id FROM scoring_jobs WHERE user_id = 1")
    backend = FailsOnUser(backend_for(queue_db, kit.make_scorer(booster, "7")), poison_user=1)
    config = WorkerConfig(
        batch_size=50, concurrency=1, max_attempts=3, backoff_seconds=0.05, poll_seconds=0.05
    )
    metrics = WorkerMetrics()
    worker = Worker(queue_db, backend, config, metrics=metrics)
    with kit.running(worker):
        kit.wait_until(
            lambda: (
                kit.query(queue_db, "SELECT status FROM scoring_jobs WHERE id = %s", (poison_id,))[
                    0
                ][0]
                == "dead"
            ),
            15,
            "the poison job to be dead-lettered",
        )
    status = kit.query(
        queue_db, "SELECT status, attempts, error FROM scoring_jobs WHERE id = %s", (poison_id,)
    )
    assert status == [("dead", 3, "scoring failed: FloatingPointError: model crashed on user 1")]
    results = kit.query(queue_db, "SELECT job_id FROM scoring_results ORDER BY job_id")
    assert [r[0] for r in results] == sorted(set(ids) - {poison_id})
    assert metrics.registry.get_sample_value("paylater_worker_jobs_dead_lettered_total") == 1
    assert (
        metrics.registry.get_sample_value("paylater_worker_jobs_failed_total", {"reason": "error"})
        == 3
    )


def test_shadow_scores_are_written_and_never_change_the_decision(
    queue_db: str, booster: Any, staging_booster: Any, kit: Any
) -> None:
    """With a Staging model present every job also gets a shadow row; its failure costs nothing."""
    primary = kit.make_scorer(booster, "7")
    staging = kit.make_scorer(staging_booster, "8")
    kit.enqueue_many(queue_db, 20)
    shadow_backend = backend_for(queue_db, staging)
    worker = Worker(queue_db, backend_for(queue_db, primary), FAST, shadow=lambda: shadow_backend)
    with queue.connect(queue_db) as conn:
        worker.run_once(conn)
    pairs = kit.query(
        queue_db,
        """SELECT r.model_version, r.probability, s.model_version, s.probability
           FROM scoring_results r JOIN shadow_results s USING (job_id)""",
    )
    assert len(pairs) == 20
    assert {(p[0], p[2]) for p in pairs} == {("7", "8")}
    assert any(p[1] != p[3] for p in pairs)  # really the other model

    # Check the primary decisions against a worker with no shadow at all.
    unshadowed = Worker(queue_db, backend_for(queue_db, primary), FAST)
    more = kit.enqueue_many(queue_db, 20)
    with queue.connect(queue_db) as conn:
        unshadowed.run_once(conn)
    same = kit.query(
        queue_db,
        """SELECT count(*) FROM scoring_results a JOIN scoring_jobs ja ON ja.id = a.job_id
           JOIN scoring_jobs jb ON jb.payload = ja.payload AND jb.user_id = ja.user_id AND jb.id = ANY(%s)
           JOIN scoring_results b ON b.job_id = jb.id
           WHERE a.job_id <> b.job_id AND a.probability = b.probability AND a.decision = b.decision""",
        (more,),
    )
    assert same == [(20,)]

    def broken() -> Any:
        raise ConnectionError("registry down")

    kit.enqueue_many(queue_db, 5)
    worker = Worker(queue_db, backend_for(queue_db, primary), FAST, shadow=broken)
    with queue.connect(queue_db) as conn:
        assert worker.run_once(conn) == 5
    assert kit.query(queue_db, "SELECT count(*) FROM scoring_results") == [(45,)]
    assert kit.query(queue_db, "SELECT count(*) FROM shadow_results") == [(20,)]


def test_notify_wakes_an_idle_worker_long_before_its_poll(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """With a 30 s poll, a new job is still scored within a second: the INSERT trigger's NOTIFY."""
    config = WorkerConfig(batch_size=50, concurrency=1, poll_seconds=30)
    worker = Worker(queue_db, backend_for(queue_db, kit.make_scorer(booster, "7")), config)
    with kit.running(worker):
        time.sleep(1.0)  # both the loop and the listener are idle now
        started = time.monotonic()
        [job_id] = kit.enqueue_many(queue_db, 1)
        kit.wait_until(
            lambda: (
                kit.query(
                    queue_db, "SELECT count(*) FROM scoring_results WHERE job_id = %s", (job_id,)
                )[0][0]
                == 1
            ),
            5,
            "the notified worker to score the job",
        )
        assert time.monotonic() - started < 2.0


def test_queue_gauges_report_depth_and_oldest_age(queue_db: str, kit: Any) -> None:
    """The scrape-time collector reads the backlog from the table."""
    kit.enqueue_many(queue_db, 3)
    time.sleep(0.3)
    samples = {m.name: m.samples[0].value for m in QueueCollector(queue_db).collect()}
    assert samples["paylater_worker_queue_depth"] == 3
    assert 0.3 <= samples["paylater_worker_oldest_queued_age_seconds"] < 30


def settled(loader: Any) -> Any:
    """The shadow a ShadowLoader gives once it has asked the registry (and loaded) now."""
    loader.refresh()
    return loader.current


def test_shadow_loader_follows_the_staging_version(
    queue_db: str, booster: Any, staging_booster: Any, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Staging version: no shadow; Staging = production: none; a new Staging version: loaded."""
    from worker import cli

    scorers = {"7": kit.make_scorer(booster, "7"), "8": kit.make_scorer(staging_booster, "8")}
    staging: dict[str, str | None] = {"version": None}
    monkeypatch.setattr(cli, "resolve_shadow_version", lambda spec: staging["version"])
    monkeypatch.setattr(
        cli, "inprocess_backend", lambda v, url, *_: InProcessBackend(scorers[v], url)
    )
    monkeypatch.setattr(cli, "SHADOW_REFRESH_SECONDS", 0.0)
    loader = cli.ShadowLoader("staging", primary_version="7", database_url=queue_db)
    assert settled(loader) is None
    staging["version"] = "7"
    assert settled(loader) is None
    staging["version"] = "8"
    shadow = settled(loader)
    assert shadow is not None and shadow.model_version == "8"
    assert settled(loader) is shadow  # cached while the version stays
    staging["version"] = None
    assert settled(loader) is None


def test_payload_python_cannot_decode_fails_alone_instead_of_blocking_the_queue(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """jsonb PostgreSQL accepts but Python's json refuses (a 5,000-digit number, 2,000 levels of
    nesting) fails that job as invalid; the jobs claimed in the same batch are still scored."""
    with queue.connect(queue_db) as conn:
        for key, payload in {
            "huge number": '{"amount_jpy": 1' + "0" * 5000 + "}",
            "deep nesting": '{"amount_jpy": ' + "[" * 2000 + "]" * 2000 + "}",
        }.items():
            conn.execute(
                "INSERT INTO scoring_jobs (idempotency_key, user_id, payload) VALUES (%s, 1, %s::jsonb)",
                (key, payload),
            )
    good = kit.enqueue_many(queue_db, 5)
    worker = Worker(queue_db, backend_for(queue_db, kit.make_scorer(booster, "7")), FAST)
    with kit.running(worker):
        kit.wait_until(
            lambda: (
                kit.query(
                    queue_db,
                    "SELECT count(*) FROM scoring_jobs WHERE status IN ('queued','running')",
                )[0][0]
                == 0
            ),
            10,
            "every job to finish",
        )
    rows = kit.query(
        queue_db,
        "SELECT idempotency_key, status, attempts, error FROM scoring_jobs "
        "WHERE idempotency_key IS NOT NULL ORDER BY idempotency_key",
    )
    assert [r[:3] for r in rows] == [("deep nesting", "failed", 1), ("huge number", "failed", 1)]
    for _, _, _, error in rows:
        assert error.startswith("invalid request: payload is not decodable JSON"), error
    done = kit.query(
        queue_db, "SELECT count(*) FROM scoring_results WHERE job_id = ANY(%s)", (good,)
    )
    assert done == [(5,)]


@pytest.mark.parametrize("kind", ["http", "inprocess"])
def test_backend_outage_spends_no_attempts_and_jobs_score_once_it_is_back(
    queue_db: str, booster: Any, kit: Any, kind: str
) -> None:
    """A scoring service or feature database that cannot be reached is nobody's fault: an outage
    outlasting the retry budget dead-letters nothing, and every job is scored once it is back."""
    import socket

    from worker.scoring import HttpBackend

    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{s.getsockname()[1]}"
    scorer = kit.make_scorer(booster, "7")
    unreachable = (
        HttpBackend(f"http://{down}")
        if kind == "http"
        else InProcessBackend(scorer, f"postgresql://{down}/features")
    )
    ids = kit.enqueue_many(queue_db, 3)
    config = WorkerConfig(
        batch_size=50, concurrency=1, max_attempts=2, backoff_seconds=0.01, poll_seconds=0.05
    )
    worker = Worker(queue_db, unreachable, config)

    def outlasted_or_dead() -> bool:
        dead = kit.query(queue_db, "SELECT count(*) FROM scoring_jobs WHERE status = 'dead'")
        return dead[0][0] > 0 or worker.totals.batches >= 3 * config.max_attempts

    with kit.running(worker):
        kit.wait_until(outlasted_or_dead, 20, "more claims than the jobs have attempts")
    unreachable.close()
    rows = kit.query(queue_db, "SELECT status, attempts, error FROM scoring_jobs ORDER BY id")
    assert [r[:2] for r in rows] == [("queued", 0)] * 3, rows
    assert all("BackendUnavailable" in r[2] for r in rows), rows

    back = Worker(queue_db, backend_for(queue_db, scorer), config)
    with kit.running(back):
        kit.wait_until(
            lambda: back.totals.processed == len(ids), 20, "the jobs to be scored after the outage"
        )
    rows = kit.query(queue_db, "SELECT status, attempts FROM scoring_jobs ORDER BY id")
    assert rows == [("done", 1)] * 3


def test_a_feature_table_the_model_does_not_fit_holds_jobs_instead_of_killing_them(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """A model that needs a column the online table lacks (the new model was promoted before
    the feature build that adds its feature published) is a deployment mismatch, not any job's
    fault: jobs wait, saying why, and are scored once the table fits."""
    scorer = kit.make_scorer(booster, "7")
    with queue.connect(queue_db) as conn:
        conn.execute("ALTER TABLE user_features_latest RENAME COLUMN topup_count_90d TO old_name")
    ids = kit.enqueue_many(queue_db, 3)
    config = WorkerConfig(
        batch_size=50, concurrency=1, max_attempts=2, backoff_seconds=0.01, poll_seconds=0.05
    )
    worker = Worker(queue_db, backend_for(queue_db, scorer), config)

    def outlasted_or_dead() -> bool:
        dead = kit.query(queue_db, "SELECT count(*) FROM scoring_jobs WHERE status <> 'queued'")
        return dead[0][0] > 0 or worker.totals.batches >= 3 * config.max_attempts

    with kit.running(worker):
        kit.wait_until(outlasted_or_dead, 20, "more claims than the jobs have attempts")
    rows = kit.query(queue_db, "SELECT status, attempts, error FROM scoring_jobs ORDER BY id")
    assert [r[:2] for r in rows] == [("queued", 0)] * 3, rows
    assert all("topup_count_90d" in r[2] and "user_features_latest" in r[2] for r in rows), rows

    with queue.connect(queue_db) as conn:
        conn.execute("ALTER TABLE user_features_latest RENAME COLUMN old_name TO topup_count_90d")
    fits = Worker(queue_db, backend_for(queue_db, scorer), config)
    with kit.running(fits):
        kit.wait_until(
            lambda: fits.totals.processed == len(ids), 20, "the jobs to be scored once it fits"
        )
    assert kit.query(queue_db, "SELECT status, attempts FROM scoring_jobs") == [("done", 1)] * 3


def test_a_backend_outage_is_logged_once_and_so_is_its_end(
    queue_db: str, booster: Any, kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Jobs held for an unreachable backend keep the worker's output silent otherwise: the
    operator who started it sees why nothing is scored, once, and when scoring resumes."""
    import socket

    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{s.getsockname()[1]}"
    scorer = kit.make_scorer(booster, "7")
    kit.enqueue_many(queue_db, 3)
    config = WorkerConfig(batch_size=50, concurrency=1, poll_seconds=0.05)
    worker = Worker(queue_db, InProcessBackend(scorer, f"postgresql://{down}/features"), config)
    caplog.set_level("INFO", logger="worker.runner")
    with queue.connect(queue_db) as conn:
        assert worker.run_once(conn) == 3
        assert worker.run_once(conn) == 0  # held jobs wait for run_after; nothing new to say
        conn.execute("UPDATE scoring_jobs SET run_after = now()")
        assert worker.run_once(conn) == 3
        worker.backend.close()
        worker.backend = backend_for(queue_db, scorer)
        conn.execute("UPDATE scoring_jobs SET run_after = now()")
        assert worker.run_once(conn) == 3
    said = [r.getMessage() for r in caplog.records if r.name == "worker.runner"]
    assert len(said) == 2, said
    assert said[0].startswith("backend unavailable, jobs held queued"), said
    assert "feature database unreachable" in said[0], said
    assert said[1] == "backend reachable again: scoring resumed"


def test_a_worker_scoring_production_follows_a_rollback_without_a_restart(
    queue_db: str, booster: Any, staging_booster: Any, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--model production` re-resolves the alias: jobs scored before the registry moved it carry
    the old version, jobs after the next refresh the new one; the shadow steps aside while it
    names the same version; a registry that cannot be asked keeps the version in hand."""
    import bentos.build
    from worker import cli

    scorers = {"7": kit.make_scorer(booster, "7"), "8": kit.make_scorer(staging_booster, "8")}
    alias: dict[str, str | None] = {"production": "7"}

    def resolve(spec: str) -> str:
        version = alias.get(spec)
        if version is None:
            raise RuntimeError("registry unreachable")
        return version

    monkeypatch.setattr(bentos.build, "resolve_version", resolve)
    monkeypatch.setattr(
        cli, "inprocess_backend", lambda v, url, *_: InProcessBackend(scorers[v], url)
    )
    monkeypatch.setattr(cli, "MODEL_REFRESH_SECONDS", 0.0)
    following = cli.FollowingBackend(
        "production", queue_db, "declines", InProcessBackend(scorers["7"], queue_db)
    )
    monkeypatch.setattr(cli, "SHADOW_REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(cli, "resolve_shadow_version", lambda spec: "8")
    shadow = cli.ShadowLoader("staging", lambda: following.model_version, queue_db)
    assert settled(shadow) is not None and following.model_version == "7"

    def score_all(n: int) -> set[str]:
        ids = kit.enqueue_many(queue_db, n)
        worker = Worker(queue_db, following, FAST)
        with kit.running(worker):
            kit.wait_until(
                lambda: (
                    kit.query(
                        queue_db,
                        "SELECT count(*) FROM scoring_results WHERE job_id = ANY(%s)",
                        (ids,),
                    )[0][0]
                    == n
                ),
                10,
                "the jobs to be scored",
            )
        rows = kit.query(
            queue_db, "SELECT model_version FROM scoring_results WHERE job_id = ANY(%s)", (ids,)
        )
        return {r[0] for r in rows}

    assert score_all(20) == {"7"}
    alias["production"] = "8"  # promoted (or rolled back to): no restart
    assert score_all(20) == {"8"}
    assert following.model_version == "8" and shadow() is None  # staging is production now
    assert settled(shadow) is None
    alias["production"] = "7"  # rolled back: staging's 8 is shadowed again
    assert score_all(5) == {"7"}
    again = settled(shadow)
    assert again is not None and again.model_version == "8"
    alias["production"] = None  # the registry cannot be asked: keep scoring with what we have
    assert score_all(5) == {"7"}
    following.close()


def test_a_store_tag_shadow_steps_aside_and_back_as_a_following_primary_moves(
    queue_db: str, booster: Any, staging_booster: Any, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shadow named by a store tag is compared with the primary by the version it loads as: off
    while the primary scores that version, back once the primary moves away (a rollback), off
    again when the primary moves to it; it is not reloaded at every refresh meanwhile."""
    from worker import cli

    tag = "paylater-default:candidate"
    scorers = {"7": kit.make_scorer(booster, "7"), tag: kit.make_scorer(staging_booster, "8")}
    loads: list[str] = []

    def load(spec: str, url: str, *_: Any) -> InProcessBackend:
        loads.append(spec)
        return InProcessBackend(scorers[spec], url)

    monkeypatch.setattr(cli, "inprocess_backend", load)
    monkeypatch.setattr(cli, "SHADOW_REFRESH_SECONDS", 0.0)
    primary = {"version": "8"}
    loader = cli.ShadowLoader(tag, lambda: primary["version"], queue_db)
    assert settled(loader) is None and settled(loader) is None and loads == [tag]
    primary["version"] = "7"  # rolled back: the tag's version 8 is a candidate again
    shadow = settled(loader)
    assert shadow is not None and shadow.model_version == "8"
    primary["version"] = "8"  # promoted: the shadow would score what the primary scores
    assert loader.current is None  # at once, before the next refresh
    assert settled(loader) is None
    assert len(loads) == 2, loads


def test_a_following_backend_never_closes_a_version_a_loop_still_scores_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch that took version 7 before the alias moved may outlast any refresh period (a slow
    feature database): 7 is closed when that batch is done, not under it."""
    import threading

    import bentos.build
    from worker import cli

    class Slow:
        def __init__(self, version: str) -> None:
            self.model_version = version
            self.closed = False
            self.started = threading.Event()
            self.release = threading.Event()

        def score(self, requests: Sequence[ScoreRequest]) -> list[Outcome]:
            self.started.set()
            self.release.wait(10)
            assert not self.closed, f"version {self.model_version} closed while scoring"
            return []

        def close(self) -> None:
            self.closed = True

    backends = {v: Slow(v) for v in ("7", "8", "9")}
    for b in backends.values():
        b.release.set()
    backends["7"].release.clear()  # 7's batch is slow
    alias = {"production": "7"}
    monkeypatch.setattr(bentos.build, "resolve_version", lambda spec: alias[spec])
    monkeypatch.setattr(cli, "inprocess_backend", lambda v, *_: backends[v])
    monkeypatch.setattr(cli, "MODEL_REFRESH_SECONDS", 0.0)
    following = cli.FollowingBackend("production", "unused", "declines", backends["7"])
    errors: list[BaseException] = []

    def slow_loop() -> None:
        try:
            following.score([])
        except BaseException as exc:  # reported below
            errors.append(exc)

    loop = threading.Thread(target=slow_loop)
    loop.start()
    assert backends["7"].started.wait(5)
    alias["production"] = "8"
    following.score([])  # swaps to 8: 7 is retired, its batch still running
    alias["production"] = "9"
    following.score([])  # swaps to 9: a later refresh
    assert not backends["7"].closed
    backends["7"].release.set()
    loop.join(5)
    assert errors == []
    assert backends["7"].closed and backends["8"].closed and not backends["9"].closed
    following.close()
    assert backends["9"].closed


def test_a_following_backend_loading_a_new_version_does_not_hold_up_the_other_loops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loading a model takes seconds: the loop that found the alias moved loads it, while the
    others go on scoring with the version in hand."""
    import threading

    import bentos.build
    from worker import cli

    class Fake:
        def __init__(self, version: str) -> None:
            self.model_version = version
            self.scored = 0

        def score(self, requests: Sequence[ScoreRequest]) -> list[Outcome]:
            self.scored += 1
            return []

        def close(self) -> None:
            pass

    loading, loaded = threading.Event(), threading.Event()

    def slow_load(version: str, *_: object) -> Fake:
        loading.set()
        assert loaded.wait(10)
        return Fake(version)

    monkeypatch.setattr(bentos.build, "resolve_version", lambda spec: "8")
    monkeypatch.setattr(cli, "inprocess_backend", slow_load)
    monkeypatch.setattr(cli, "MODEL_REFRESH_SECONDS", 0.0)
    seven = Fake("7")
    following = cli.FollowingBackend("production", "unused", "declines", seven)
    refresher = threading.Thread(target=following.score, args=([],))
    refresher.start()
    assert loading.wait(5)
    other = threading.Thread(target=following.score, args=([],))
    other.start()
    other.join(5)
    assert not other.is_alive() and seven.scored == 1  # scored with 7 during the load
    loaded.set()
    refresher.join(5)
    assert following.model_version == "8"


def test_loading_a_new_shadow_version_never_holds_up_a_scoring_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, kit: Any
) -> None:
    """Staging moved to 9, whose load takes seconds: the shadow was loaded under the lock each
    loop's shadow lookup takes, so every loop waited for it. Now the loops get version 8 at once
    until 9 is loaded, then 9; a version that fails to load leaves 9 in place, with a warning."""
    import threading

    from worker import cli

    class Fake:
        def __init__(self, version: str) -> None:
            self.model_version = version
            self.closed = False

        def score(self, requests: Sequence[ScoreRequest]) -> list[Outcome]:
            return []

        def close(self) -> None:
            self.closed = True

    loading, release = threading.Event(), threading.Event()
    tried: list[str] = []

    def load(version: str, *_: object) -> Fake:
        tried.append(version)
        if version == "9":
            loading.set()
            assert release.wait(10)
        if version == "10":
            raise OSError("model file missing")
        return Fake(version)

    staging = {"version": "8"}
    monkeypatch.setattr(cli, "resolve_shadow_version", lambda spec: staging["version"])
    monkeypatch.setattr(cli, "inprocess_backend", load)
    monkeypatch.setattr(cli, "SHADOW_REFRESH_SECONDS", 0.0)
    loader = cli.ShadowLoader("staging", "7", "unused")
    kit.wait_until(lambda: loader() is not None, 5, "shadow version 8 to load")
    eight = loader()
    assert isinstance(eight, Fake) and eight.model_version == "8"

    staging["version"] = "9"
    threading.Timer(3.0, release.set).start()  # ends the load at the latest (the old code waits)
    started = time.monotonic()
    assert loader() is eight
    assert loading.wait(5)
    answers = {loader() for _ in range(100)}  # while 9 loads
    assert time.monotonic() - started < 1.0, "the scoring side waited for the load"
    assert answers == {eight} and not eight.closed
    release.set()
    kit.wait_until(lambda: getattr(loader(), "model_version", None) == "9", 5, "9 to load")
    nine = loader()
    assert eight.closed

    caplog.set_level("WARNING", logger="worker.cli")
    staging["version"] = "10"

    def tried_twice() -> bool:
        loader()  # a scoring loop's lookup: it starts a refresh when none runs
        return tried.count("10") >= 2

    kit.wait_until(tried_twice, 5, "10 to be tried (and tried again)")
    assert loader() is nine and isinstance(nine, Fake) and not nine.closed
    assert "shadow model 10 (staging) not loadable (OSError('model file missing'))" in caplog.text
    assert "still shadowing with 9" in caplog.text


class HangingService:
    """A scoring service over real HTTP: the bento's /v2/score_batch answers, computed by a real
    in-process backend, except that a batch holding one of the users `hang_user` (any batch,
    when None) gets no answer for `hang_seconds`, as a request the service is stuck on."""

    def __init__(
        self, inner: InProcessBackend, hang_user: Sequence[int] | None, hang_seconds: float
    ) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.batches: list[list[int]] = []
        self.hang_user = hang_user  # changeable while it runs
        lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                items = json.loads(self.rfile.read(int(self.headers["content-length"])))
                users = [int(item["user_id"]) for item in items]
                service.batches.append(users)
                if service.hang_user is None or set(service.hang_user) & set(users):
                    time.sleep(hang_seconds)
                    return  # the client has given up: close without an answer
                requests = [
                    ScoreRequest(i, int(x["user_id"]), int(x["amount_jpy"]))
                    for i, x in enumerate(items)
                ]
                with lock:
                    outcomes = inner.score(requests)
                body = json.dumps(
                    [
                        {
                            "default_probability": o.default_probability,
                            "decision": o.decision,
                            "model_version": o.model_version,
                            "reason_codes": o.reason_codes,
                        }
                        for o in outcomes
                        if isinstance(o, ScoreOutcome)
                    ]
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs=QUICK_SHUTDOWN, daemon=True
        ).start()

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


def run_against_hanging_service(
    queue_db: str,
    booster: Any,
    kit: Any,
    *,
    until: Any,
    what: str,
    hang_user: Sequence[int] | None = (5,),
    timeout_seconds: float = 0.3,
    hang_seconds: float = 1.0,
    **config: Any,
) -> tuple[Worker, HangingService]:
    """Run a worker over HTTP against a HangingService until `until(worker)` holds (or fail
    naming `what`); the worker and the service, both stopped. By default user 5 hangs the
    service, whose client gives up after 0.3 s; `config`: WorkerConfig fields."""
    from worker.scoring import HttpBackend

    service = HangingService(
        backend_for(queue_db, kit.make_scorer(booster, "7")), hang_user, hang_seconds
    )
    backend = HttpBackend(service.url, timeout_seconds=timeout_seconds)
    worker = Worker(queue_db, backend, WorkerConfig(batch_size=50, poll_seconds=0.05, **config))
    try:
        with kit.running(worker):
            kit.wait_until(lambda: until(worker), 30, what)
    finally:
        backend.close()
        service.close()
    return worker, service


def counted(kit: Any, queue_db: str, statuses: tuple[str, ...], n: int) -> Any:
    """A wait condition: exactly n jobs in `statuses`."""
    return lambda _: (
        kit.query(
            queue_db, "SELECT count(*) FROM scoring_jobs WHERE status = ANY(%s)", (list(statuses),)
        )
        == [(n,)]
    )


def test_a_job_that_hangs_the_service_is_dead_lettered_and_its_batch_mates_are_scored(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """A request the service hangs on is found by trying halves of its batch, spends its
    attempts and is dead-lettered; before, every batch it was in was given back as an outage,
    forever, and its batch-mates were never scored."""
    ids = kit.enqueue_many(queue_db, 20)  # users 2..21: user 5 hangs the service
    [(stuck_id,)] = kit.query(queue_db, "SELECT id FROM scoring_jobs WHERE user_id = 5")
    # The search (about six waits of 0.3 s) outlasts the lease: it is renewed, or the second
    # loop would claim the batch from under the first.
    worker, service = run_against_hanging_service(
        queue_db,
        booster,
        kit,
        until=counted(kit, queue_db, ("done", "dead"), 20),
        what="every job scored or dead-lettered",
        concurrency=2,
        lease_seconds=1.0,
        max_attempts=2,
        backoff_seconds=0.05,
    )
    [(status, attempts, error)] = kit.query(
        queue_db, "SELECT status, attempts, error FROM scoring_jobs WHERE id = %s", (stuck_id,)
    )
    assert (status, attempts) == ("dead", 2)
    # Its second attempt came alone: still blamed, since the first had singled it out.
    assert "BackendTimeout" in error and HUNG in error and "earlier attempt" in error, error
    results = kit.query(queue_db, "SELECT job_id FROM scoring_results ORDER BY job_id")
    assert [r[0] for r in results] == sorted(set(ids) - {stuck_id})
    # Found by halves: a call per level of the split holding it (20, 10, 5, 2 or 3, ...), then
    # one call alone; not one per job.
    assert sum(5 in batch for batch in service.batches) <= 7, service.batches
    assert worker.totals.lease_lost == 0


def test_a_service_slow_for_every_batch_dead_letters_nothing(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """When neither half of a batch is answered in time the service is slow, not the jobs: they
    wait with no attempt spent, and each claim costs three calls, not a split down to every job."""
    kit.enqueue_many(queue_db, 8)
    _, service = run_against_hanging_service(
        queue_db,
        booster,
        kit,
        hang_user=None,
        timeout_seconds=0.2,
        hang_seconds=0.5,
        # A third claim: had the first two spent an attempt, the jobs would be dead by now.
        until=lambda worker: worker.totals.batches >= 3,
        what="more claims than the jobs have attempts",
        max_attempts=2,
        backoff_seconds=0.01,
        # One loop: with two, a loaded machine lets one loop claim a single job while the other
        # claims the rest, and a lone job waits with its own message (nothing to compare it
        # with), which is right but not what this test is about (it failed 2 runs in 18 beside
        # two busy processes). The jobs of one claim are held together, so one loop reclaims
        # all eight each time.
        concurrency=1,
    )
    rows = kit.query(queue_db, "SELECT status, attempts, error FROM scoring_jobs ORDER BY id")
    assert [r[:2] for r in rows] == [("queued", 0)] * 8, rows
    assert all("slow for everyone" in r[2] for r in rows), rows
    eight = [b for b in service.batches if len(b) == 8]
    assert len(service.batches) == 3 * len(eight), service.batches


def test_a_lease_too_short_to_search_for_the_hanging_job_gives_the_batch_back(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """The search for a job that hangs the backend stays inside the claim's lease: when even a
    renewed lease leaves no time for two more waits, the batch goes back queued, nobody blamed.

    A 2.2 s lease against a 1 s scoring timeout: renewed, it leaves 1.76 s for the writes, less
    than two more waits (2 s or more however slow the machine), so the halves are never tried;
    and the renewal comes 1.2 s before the lease runs out (0.5 s against 0.3 s left 0.2 s: a
    stall that long, common on a loaded 2-core machine, lost the lease). One loop: with two, a
    loaded machine lets the second loop claim a job the first did not reach, and score it alone
    (failed once beside three busy processes), which is right but not what this test is about."""
    kit.enqueue_many(queue_db, 20)
    worker, service = run_against_hanging_service(
        queue_db,
        booster,
        kit,
        until=lambda worker: worker.totals.batches >= 3,
        what="three claims",
        timeout_seconds=1.0,
        hang_seconds=3.0,  # well past the client's timeout: never a closed connection instead
        lease_seconds=2.2,
        max_attempts=2,
        backoff_seconds=0.01,
        concurrency=1,
    )
    rows = kit.query(queue_db, "SELECT status, attempts, error FROM scoring_jobs ORDER BY id")
    assert [r[:2] for r in rows] == [("queued", 0)] * 20, rows
    assert all("no answer in" in r[2] for r in rows), rows
    assert worker.totals.lease_lost == 0
    assert all(len(batch) == 20 for batch in service.batches), service.batches


def test_two_jobs_that_hang_the_service_in_one_answered_half_are_both_found(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """Two requests the service hangs on (two jobs of one user) in the half that got no answer:
    its halves then both time out, but the other half had just been answered, so the service is
    not slow for everyone; each is blamed, and the pair is not given back as an outage forever."""
    with queue.connect(queue_db) as conn:
        ids = [queue.enqueue(conn, user, 30_000)[0] for user in (2, 3, 5, 5, 6, 7, 8, 9)]
    stuck = set(ids[2:4])
    run_against_hanging_service(
        queue_db,
        booster,
        kit,
        until=counted(kit, queue_db, ("dead",), 2),
        what="both jobs of the hanging user dead-lettered",
        lease_seconds=5.0,
        max_attempts=1,
        backoff_seconds=0.05,
    )
    rows = kit.query(queue_db, "SELECT id, status, error FROM scoring_jobs ORDER BY id")
    assert [r[1] for r in rows if r[0] in stuck] == ["dead", "dead"], rows
    assert all(HUNG in r[2] for r in rows if r[0] in stuck), rows
    assert [r[1] for r in rows if r[0] not in stuck] == ["done"] * 6, rows
    # The service answered the other half: nothing was taken for an outage.
    assert not any("slow for everyone" in (r[2] or "") for r in rows), rows


def test_jobs_of_a_user_the_service_hangs_on_are_found_wherever_they_sit_in_the_batch(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """A user whose requests all hang the service, with jobs claimed in both halves of the batch:
    split as claimed, neither half would answer and the whole batch would be given back as a
    slow service, forever. The batch is split by user, so their jobs fall in one half."""
    with queue.connect(queue_db) as conn:
        ids = [queue.enqueue(conn, user, 30_000)[0] for user in (5, 2, 3, 4, 6, 7, 8, 5)]
    stuck = {ids[0], ids[-1]}
    run_against_hanging_service(
        queue_db,
        booster,
        kit,
        until=counted(kit, queue_db, ("done", "dead"), 8),
        what="every job scored or dead-lettered",
        max_attempts=1,
        backoff_seconds=0.05,
    )
    rows = kit.query(queue_db, "SELECT id, status, error FROM scoring_jobs ORDER BY id")
    assert {r[0]: r[1] for r in rows} == {i: "dead" if i in stuck else "done" for i in ids}, rows
    assert all(HUNG in r[2] for r in rows if r[0] in stuck), rows


def test_jobs_already_found_hanging_the_service_are_blamed_when_claimed_only_together(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """After a first search blamed them, a user's two jobs come back due at the same time and are
    claimed without batch-mates: nothing answers, which alone would read as a slow service. They
    were singled out before, so they spend their attempt instead of coming back forever."""
    with queue.connect(queue_db) as conn:
        ids = [queue.enqueue(conn, 5, amount)[0] for amount in (30_000, 40_000)]
        conn.execute(
            "UPDATE scoring_jobs SET attempts = 1, error = %s WHERE id = ANY(%s)",
            (f"scoring failed: BackendTimeout: no answer; the job {HUNG}", ids),
        )
    run_against_hanging_service(
        queue_db,
        booster,
        kit,
        until=counted(kit, queue_db, ("dead",), 2),
        what="both jobs dead-lettered",
        max_attempts=2,
        backoff_seconds=0.05,
    )
    rows = kit.query(queue_db, "SELECT attempts, error FROM scoring_jobs ORDER BY id")
    assert [r[0] for r in rows] == [2, 2], rows
    assert all("earlier attempt" in r[1] for r in rows), rows


def test_a_search_stops_once_another_worker_holds_the_batch(queue_db: str, kit: Any) -> None:
    """Renewing finds none of the jobs held any more (the lease ran out and another worker claimed
    them): the search asks the hanging service nothing more."""
    from worker.runner import Claim
    from worker.scoring import BackendTimeout

    kit.enqueue_many(queue_db, 4)
    with queue.connect(queue_db) as conn:
        jobs = queue.claim(conn, 10, 30)
        conn.execute("UPDATE scoring_jobs SET attempts = attempts + 1")  # claimed again elsewhere

        class Hangs:
            model_version = "7"
            calls = 0

            def score(self, requests: Sequence[ScoreRequest]) -> list[Outcome]:
                Hangs.calls += 1
                raise BackendTimeout("no answer")

            def close(self) -> None:
                pass

        claim = Claim(conn, jobs, 30)
        worker = Worker(queue_db, Hangs(), FAST)
        requests = [ScoreRequest(j.id, j.user_id, 30_000) for j in jobs]
        outcomes = worker.isolate_timeout(Hangs(), requests, frozenset(), claim, 0.01)
    assert Hangs.calls == 0
    assert all(type(o).__name__ == "BackendUnavailable" for o in outcomes), outcomes


def test_two_users_the_service_hangs_on_one_in_each_half_are_found_on_a_later_claim(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """Users 5 and 7 both hang the service. A claim that splits them one to each half gets no
    answer at all and reads as a slow service; users are shuffled anew on each search, so a later
    claim puts them in one half, the other half answers, and both are found."""
    with queue.connect(queue_db) as conn:
        ids = [queue.enqueue(conn, user, 30_000)[0] for user in (2, 3, 4, 5, 6, 7, 8, 9)]
    stuck = {ids[3], ids[5]}
    run_against_hanging_service(
        queue_db,
        booster,
        kit,
        hang_user=(5, 7),
        until=counted(kit, queue_db, ("done", "dead"), 8),
        what="every job scored or dead-lettered",
        max_attempts=1,
        backoff_seconds=0.01,
    )
    rows = kit.query(queue_db, "SELECT id, status, error FROM scoring_jobs ORDER BY id")
    assert {r[0]: r[1] for r in rows} == {i: "dead" if i in stuck else "done" for i in ids}, rows
    assert all(HUNG in r[2] for r in rows if r[0] in stuck), rows


def scored_then_alone(
    queue_db: str, booster: Any, kit: Any, alone: Sequence[int], hang_all: bool = False
) -> tuple[list[tuple[Any, ...]], HangingService]:
    """One worker loop, by hand, against a HangingService on which user 5 hangs: a first claim of
    users 2 and 3 is answered (user 2's request becomes the reference); then a claim of only `alone`'s jobs (users), with the service
    hanging on every request when `hang_all`. The second claim's jobs' (status, attempts, error)."""
    from worker.scoring import HttpBackend

    service = HangingService(backend_for(queue_db, kit.make_scorer(booster, "7")), (5,), 1.0)
    backend = HttpBackend(service.url, timeout_seconds=0.3)
    worker = Worker(queue_db, backend, WorkerConfig(batch_size=50, lease_seconds=5.0))
    try:
        with queue.connect(queue_db) as conn:
            for user in (2, 3):
                queue.enqueue(conn, user, 30_000)
            assert worker.run_once(conn) == 2
            ids = [queue.enqueue(conn, user, 30_000 + i)[0] for i, user in enumerate(alone)]
            if hang_all:
                service.hang_user = None
            assert worker.run_once(conn) == len(alone)
    finally:
        backend.close()
        service.close()
    rows = kit.query(
        queue_db,
        "SELECT status, attempts, error FROM scoring_jobs WHERE id = ANY(%s) ORDER BY id",
        (ids,),
    )
    return rows, service


def test_a_lone_job_that_hangs_the_service_is_blamed_when_another_request_is_answered(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """A job claimed alone gets no answer: before, nothing told a slow service from a request it
    hangs on, so it waited, no attempt spent, until claimed with others, which in a quiet queue
    may never happen. The last request the service answered (user 2's), asked again alone, is
    answered: the job is blamed and spends its attempt."""
    rows, service = scored_then_alone(queue_db, booster, kit, alone=(5,))
    [(status, attempts, error)] = rows
    assert (status, attempts) == ("queued", 1), rows  # retried, then dead-lettered
    assert HUNG in error and "user 2's request, asked alone, was answered" in error, error
    assert service.batches[-2:] == [[5], [2]], service.batches


def test_a_batch_of_one_users_jobs_that_hang_the_service_is_blamed_whole(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """Three jobs of user 5, claimed without other users' jobs: neither half answers. Another
    user's request is answered meanwhile, so the service is stuck on this user: the three spend
    an attempt together, in four calls (the batch, its halves, the reference), not one per job."""
    rows, service = scored_then_alone(queue_db, booster, kit, alone=(5, 5, 5))
    assert [r[:2] for r in rows] == [("queued", 1)] * 3, rows
    assert all(HUNG in r[2] for r in rows), rows
    assert service.batches[1:] == [[5, 5, 5], [5], [5, 5], [2]], service.batches


def test_a_lone_job_is_not_blamed_when_the_service_answers_nobody(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """The service stops answering anyone: the lone job gets no answer, nor does the reference
    request asked after it, so the service is slow for everyone and the job waits, no attempt
    spent."""
    rows, service = scored_then_alone(queue_db, booster, kit, alone=(6,), hang_all=True)
    [(status, attempts, error)] = rows
    assert (status, attempts) == ("queued", 0), rows
    assert HUNG not in error and "nothing else answered to compare with" in error, error
    assert service.batches[-2:] == [[6], [2]], service.batches


class WorkerKilled(BaseException):
    """Stands for the worker process dying (OOM, segfault): nothing after it runs, no except."""


class KillsWorkerOnUser(FailsOnUser):
    """A real backend whose process dies whenever one user's rows are scored."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[Outcome]:
        """Die like the process would when the poison user is in the call."""
        self.calls += 1
        if any(r.user_id == self.poison_user for r in requests):
            raise WorkerKilled(f"worker died scoring user {self.poison_user}")
        return self.inner.score(requests)


def test_a_job_that_kills_its_worker_is_dead_lettered_alone_not_with_its_batch(
    queue_db: str, booster: Any, kit: Any
) -> None:
    """A job that kills every worker scoring it: its batch-mates' leases ran out with it, and they
    were re-claimed together with it, died with it each time and were dead-lettered with it at
    max_attempts (never scored). Jobs taken back from a dead worker are now claimed one at a
    time: the batch-mates are scored, the killer alone is dead-lettered, saying its workers died."""
    ids = kit.enqueue_many(queue_db, 10)  # users 2..11: user 5 kills the worker
    [(killer_id,)] = kit.query(queue_db, "SELECT id FROM scoring_jobs WHERE user_id = 5")
    backend = KillsWorkerOnUser(backend_for(queue_db, kit.make_scorer(booster, "7")), 5)
    # Lease 0: a dead worker's jobs are due again at once (no wait for the lease in the test).
    config = WorkerConfig(batch_size=50, concurrency=1, lease_seconds=0, max_attempts=3)
    deaths = 0
    with queue.connect(queue_db) as conn:
        for _ in range(50):  # each iteration: a (re)started worker's next batch
            if not kit.query(
                queue_db, "SELECT 1 FROM scoring_jobs WHERE status IN ('queued', 'running')"
            ):
                break
            try:
                Worker(queue_db, backend, config).run_once(conn)
            except WorkerKilled:
                deaths += 1
    rows = dict(kit.query(queue_db, "SELECT id, status FROM scoring_jobs"))
    assert rows == {i: "dead" if i == killer_id else "done" for i in ids}
    [(attempts, error)] = kit.query(
        queue_db, "SELECT attempts, error FROM scoring_jobs WHERE id = %s", (killer_id,)
    )
    assert deaths == 3 and attempts == 4 and "lease expired" in error
