"""A database the network stopped answering (a partition, a failed-over host): the worker reports
it, reconnects when it answers again, and loses no job. Real PostgreSQL behind a real TCP proxy on
loopback that, on command, keeps every connection open and forwards nothing."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

TIMEOUT_SECONDS = 2.0
"""PAYLATER_WORKER_DATABASE_TIMEOUT_SECONDS in these tests."""


class BlackHoleProxy:
    """Forwards loopback connections to PostgreSQL; `silence()` keeps them (and new ones) open
    but forwards nothing either way, as a partition looks to the worker; `resume()` undoes it."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = [self._server]
        self.accepted = 0  # connections accepted so far
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        """Stop forwarding; every connection stays open."""
        self._forwarding.clear()

    def resume(self, reset: bool = False) -> None:
        """Forward again: what was sent meanwhile is delivered then (a partition that healed in
        time), or with `reset` every connection open during the silence is cut first and its
        undelivered data lost (one that outlasted TCP's retries: the connections died)."""
        if reset:
            for sock in self._sockets[1:]:
                sock.close()
        self._forwarding.set()

    def cut(self, first: int | None = None) -> None:
        """Cut every connection open now (or only the `first` accepted), their undelivered data
        lost, and stay silent: the connections died (TCP gave up) while the network is down."""
        for sock in self._sockets[1 : None if first is None else 1 + 2 * first]:
            sock.close()

    def pending(self) -> bool:
        """Whether a client sent something the silence has not forwarded (a call is waiting)."""
        clients = self._sockets[1::2]
        try:
            readable, _, _ = select.select(clients, [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    def close(self) -> None:
        """Close every socket (unblocks whatever still waits on one)."""
        self._closed.set()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        """Accept clients, each with its own connection to PostgreSQL."""
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self._sockets += [client, upstream]
            self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy src to dst while forwarding; silent, read nothing (the sender's data waits)."""
        while not self._closed.is_set():
            if not self._forwarding.wait(0.1):
                continue
            try:
                readable, _, _ = select.select([src], [], [], 0.1)
                if not readable or not self._forwarding.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except (OSError, ValueError):
                return


@pytest.fixture
def proxy(pg_url: str) -> Iterator[BlackHoleProxy]:
    """A black-hole proxy in front of the test server."""
    parts = urlsplit(pg_url)
    proxy = BlackHoleProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    yield proxy
    proxy.close()


@pytest.fixture
def silent_after(monkeypatch: pytest.MonkeyPatch) -> float:
    """The worker's database calls bounded to TIMEOUT_SECONDS (through the settings)."""
    monkeypatch.setenv("PAYLATER_WORKER_DATABASE_TIMEOUT_SECONDS", str(TIMEOUT_SECONDS))
    return TIMEOUT_SECONDS


def through(url: str, proxy: BlackHoleProxy, connect_timeout: int = 2) -> str:
    """`url` via the proxy, with a short connect timeout so reconnects while silent fail soon."""
    parts = urlsplit(url)
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc, query=f"connect_timeout={connect_timeout}"))


class GatedBackend:
    """A real backend whose first batch waits for `release` once it has its scores: the test
    silences the network while the worker holds a claimed batch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_version = inner.model_version
        self.entered = threading.Event()
        self.release = threading.Event()

    def score(self, requests: Sequence[Any]) -> list[Any]:
        """The inner backend's outcomes; the first call waits for `release` before returning."""
        outcomes = self.inner.score(requests)
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(120), "the test never released the batch"
        return list(outcomes)

    def close(self) -> None:
        """Close the inner backend."""
        self.inner.close()


def gated_worker(
    queue_db: str,
    booster: Any,
    kit: Any,
    proxy: BlackHoleProxy,
    gate: type[GatedBackend] = GatedBackend,
    connect_timeout: int = 2,
    **config: Any,
) -> tuple[list[int], GatedBackend, Any, Any]:
    """(job ids, backend, worker, metrics): six jobs queued, one worker loop scoring them in
    process behind `gate`, its queue reached through the proxy. A lease far longer than the
    tests: only an explicit give-back can requeue a batch. `config`: WorkerConfig overrides."""
    from worker.metrics import WorkerMetrics
    from worker.runner import Worker, WorkerConfig
    from worker.scoring import InProcessBackend

    ids = kit.enqueue_many(queue_db, 6)
    backend = gate(InProcessBackend(kit.make_scorer(booster, "7"), queue_db))
    settings = {"concurrency": 1, "lease_seconds": 600, "poll_seconds": 0.2, **config}
    metrics = WorkerMetrics()
    url = through(queue_db, proxy, connect_timeout)
    worker = Worker(url, backend, WorkerConfig.from_settings(**settings), metrics=metrics)
    return ids, backend, worker, metrics


def silence_once_claimed(backend: GatedBackend, proxy: BlackHoleProxy) -> None:
    """Once the worker holds its batch, silence the network and let the batch go on: the
    worker's next database call (writing the scores, renewing the lease) meets the silence."""
    assert backend.entered.wait(60), "the worker never claimed the batch"
    proxy.silence()
    backend.release.set()


def wait_reported_silent(kit: Any, metrics: Any) -> None:
    """Until the worker has counted a database call that got no answer."""
    kit.wait_until(
        lambda: sample(metrics, "paylater_worker_database_errors_total", reason="no_answer"),
        90,
        "the worker to report the queue database silent",
    )


def sample(metrics: Any, name: str, **labels: str) -> float:
    """A metric's current value (0 when it does not exist)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def jobs_of(kit: Any, url: str, ids: list[int]) -> list[tuple[Any, ...]]:
    """(status, attempts, results) of each job."""
    return kit.query(
        url,
        """SELECT j.status, j.attempts, count(r.job_id) FROM scoring_jobs j
           LEFT JOIN scoring_results r ON r.job_id = j.id
           WHERE j.id = ANY(%s) GROUP BY j.id ORDER BY j.id""",
        (ids,),
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("reset", [True, False], ids=["connections-lost", "partition-healed"])
def test_a_queue_gone_silent_under_a_claimed_batch_is_reported_and_no_job_lost(
    reset: bool,
    queue_db: str,
    booster: Any,
    proxy: BlackHoleProxy,
    silent_after: float,
    kit: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:

    ids, backend, worker, metrics = gated_worker(queue_db, booster, kit, proxy)
    with kit.running(worker):
        silence_once_claimed(backend, proxy)
        wait_reported_silent(kit, metrics)
        assert all(status == "running" for status, _, _ in jobs_of(kit, queue_db, ids))
        proxy.resume(reset=reset)
        kit.wait_until(
            lambda: all(s == "done" for s, _, _ in jobs_of(kit, queue_db, ids)),
            90,
            "the batch to be written, or given back and scored, once the database answers",
        )
    # Scored once, no attempt spent: given back after the write was lost, or the write delivered
    # late and the give-back fenced off by it.
    assert jobs_of(kit, queue_db, ids) == [("done", 1, 1)] * len(ids)
    held = sample(metrics, "paylater_worker_jobs_held_total")
    assert held == (len(ids) if reset else 0)
    assert any("gave no answer within" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(240)
def test_a_feature_database_gone_silent_holds_the_jobs_until_it_answers(
    queue_db: str,
    booster: Any,
    proxy: BlackHoleProxy,
    silent_after: float,
    kit: Any,
) -> None:
    from worker.metrics import WorkerMetrics
    from worker.runner import Worker, WorkerConfig
    from worker.scoring import InProcessBackend

    features = InProcessBackend(kit.make_scorer(booster, "7"), through(queue_db, proxy))
    config = WorkerConfig.from_settings(concurrency=1, lease_seconds=600, poll_seconds=0.2)
    metrics = WorkerMetrics()
    worker = Worker(queue_db, features, config, metrics=metrics)
    with kit.running(worker):
        ids = kit.enqueue_many(queue_db, 6)
        kit.wait_until(
            lambda: all(s == "done" for s, _, _ in jobs_of(kit, queue_db, ids)),
            60,
            "the first jobs to be scored",
        )
        proxy.silence()  # the lookup connection, open and idle, stops answering
        later = kit.enqueue_many(queue_db, 6)
        kit.wait_until(
            lambda: sample(metrics, "paylater_worker_jobs_held_total") >= len(later),
            90,
            "the jobs to be held while the feature database is silent",
        )
        proxy.resume()
        kit.wait_until(
            lambda: all(s == "done" for s, _, _ in jobs_of(kit, queue_db, later)),
            90,
            "the held jobs to be scored once the feature database answers",
        )
    assert jobs_of(kit, queue_db, later) == [("done", 1, 1)] * len(later)
    features.close()


@pytest.mark.timeout(240)
def test_a_transaction_whose_client_went_silent_does_not_hold_its_jobs_locked(
    queue_db: str, proxy: BlackHoleProxy, kit: Any
) -> None:
    """A worker cut off between its write and its COMMIT left the server holding the jobs' row
    locks (claims skip them) until the server's own keepalives noticed, hours. The server now
    ends such a transaction after twice the answer timeout."""
    from worker.queue import connect

    [job] = kit.enqueue_many(queue_db, 1)
    conn = connect(through(queue_db, proxy), answer_timeout=TIMEOUT_SECONDS)
    conn.execute("BEGIN")
    conn.execute("SELECT id FROM scoring_jobs WHERE id = %s FOR UPDATE", (job,))
    proxy.silence()  # the COMMIT, or anything else, never arrives

    def claimable() -> bool:
        rows = kit.query(
            queue_db, "SELECT id FROM scoring_jobs WHERE id = %s FOR UPDATE SKIP LOCKED", (job,)
        )
        return bool(rows)

    kit.wait_until(claimable, 90, "the silent client's transaction to let go of the job")
    conn.close()


class TimingOutBackend(GatedBackend):
    """A GatedBackend whose first (whole) batch gets no answer in time once released: the worker
    renews the claim's lease before it tries the halves, which the inner backend then answers."""

    def score(self, requests: Sequence[Any]) -> list[Any]:
        """BackendTimeout for the first batch, after `release`; the inner outcomes after that."""
        from worker.scoring import BackendTimeout

        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(120), "the test never released the batch"
            raise BackendTimeout("no answer in 0.3 s")
        return list(self.inner.score(requests))


@pytest.mark.timeout(240)
def test_silence_first_met_by_a_lease_renewal_is_counted_as_no_answer(
    queue_db: str,
    booster: Any,
    proxy: BlackHoleProxy,
    silent_after: float,
    kit: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The renewal before a search got no answer and closed the connection; the write after it
    then failed on the closed connection, and was counted as reason="error" (a broken
    statement) instead of "no_answer" (a silent network), which is what happened."""

    ids, backend, worker, metrics = gated_worker(
        queue_db, booster, kit, proxy, gate=TimingOutBackend
    )
    with kit.running(worker):
        silence_once_claimed(backend, proxy)  # the lease renewal meets the silence
        kit.wait_until(lambda: worker.totals.database_errors, 90, "the lost batch to be counted")
        proxy.resume(reset=True)
        kit.wait_until(
            lambda: all(s == "done" for s, _, _ in jobs_of(kit, queue_db, ids)),
            90,
            "the batch to be given back and scored once the database answers",
        )
    # (Not error == 0: a reconnect the reset cuts off half-way is an error, as it should be.)
    assert sample(metrics, "paylater_worker_database_errors_total", reason="no_answer") >= 1
    [lost] = [
        r.getMessage() for r in caplog.records if "giving back 6 claimed jobs" in r.getMessage()
    ]
    assert "gave no answer within" in lost
    assert jobs_of(kit, queue_db, ids) == [("done", 1, 1)] * len(ids)


@pytest.mark.timeout(240)
def test_a_worker_stopped_during_an_outage_gives_back_the_batch_it_could_not_write(
    queue_db: str,
    booster: Any,
    proxy: BlackHoleProxy,
    silent_after: float,
    kit: Any,
) -> None:
    """Stopped while its database was silent, the worker exited holding the batch it could not
    write: its jobs waited for their lease to run out (here 10 minutes) before any worker could
    score them. It now makes one bounded last attempt to give them back as it stops."""
    from worker.runner import GIVEN_BACK

    ids, backend, worker, metrics = gated_worker(queue_db, booster, kit, proxy)
    with kit.running(worker):
        silence_once_claimed(backend, proxy)
        wait_reported_silent(kit, metrics)
        proxy.cut()  # the write is lost with its connection; the network stays silent
        before = proxy.accepted
        worker.stop()
        # Its reconnects were stopped: a connection opened now is the last attempt to give the
        # batch back (or, at worst, a reconnect that began just before the stop: it gives the
        # batch back too). The database answers it.
        kit.wait_until(lambda: proxy.accepted > before, 30, "a last attempt to give the batch back")
        proxy.resume()
    rows = kit.query(queue_db, "SELECT status, attempts, error FROM scoring_jobs ORDER BY id")
    assert [r[:2] for r in rows] == [("queued", 0)] * len(ids), rows
    assert all(r[2] == GIVEN_BACK for r in rows), rows
    assert sample(metrics, "paylater_worker_jobs_held_total") == len(ids)


@pytest.mark.timeout(240)
def test_a_worker_stopped_while_its_database_stays_silent_stops_within_a_bound(
    queue_db: str,
    booster: Any,
    proxy: BlackHoleProxy,
    silent_after: float,
    kit: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The last attempt to give the batch back is bounded: a database still silent does not hold
    the worker's shutdown (kit.running fails when the worker has not stopped within 30 s), and the
    log says the jobs wait for their lease instead."""

    ids, backend, worker, _ = gated_worker(queue_db, booster, kit, proxy)
    with kit.running(worker):
        silence_once_claimed(backend, proxy)
        kit.wait_until(lambda: worker.totals.database_errors, 90, "the write to fail")
        proxy.cut()
    assert all(status == "running" for status, _, _ in jobs_of(kit, queue_db, ids))
    assert "could not give back 6 claimed jobs on shutdown" in caplog.text


@pytest.mark.timeout(240)
def test_reconnects_a_silent_database_does_not_answer_are_counted_as_no_answer(
    queue_db: str, proxy: BlackHoleProxy, silent_after: float, kit: Any
) -> None:
    """A reconnect whose connect_timeout ran out (the network still silent) was counted as
    reason="error" and logged as a failed batch with a traceback, every few seconds of an
    outage: the metric said the database was erring, not that it was silent."""
    from worker.metrics import WorkerMetrics
    from worker.runner import Worker, WorkerConfig

    config = WorkerConfig.from_settings(concurrency=1, poll_seconds=0.2)
    metrics = WorkerMetrics()
    proxy.silence()  # from the first connection on
    worker = Worker(through(queue_db, proxy), _NeverCalled(), config, metrics=metrics)
    with kit.running(worker):
        kit.wait_until(lambda: worker.totals.database_errors >= 2, 90, "two failed connects")
    assert sample(metrics, "paylater_worker_database_errors_total", reason="error") == 0
    assert sample(metrics, "paylater_worker_database_errors_total", reason="no_answer") >= 2


class _NeverCalled:
    """A backend for a worker that never claims anything."""

    model_version = "none"

    def score(self, requests: Sequence[Any]) -> list[Any]:
        """Never called: nothing is claimed."""
        raise AssertionError("nothing should have been claimed")

    def close(self) -> None:
        """Nothing to release."""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("answers", [True, False], ids=["answers-again", "stays-silent"])
def test_a_stop_cuts_a_call_waiting_on_a_silent_database_short(
    answers: bool,
    queue_db: str,
    booster: Any,
    proxy: BlackHoleProxy,
    kit: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stopped while its write waited on a silent database, the worker waited out the whole
    database timeout (30 s), then up to about 10 s more to give the batch back: past a 30 s
    termination grace period, it was SIGKILLed with the batch still claimed. A stop now cuts the
    waiting call short, and the batch is given back, or the log says it was not."""
    from worker.runner import GIVEN_BACK

    # Production's database timeout, and connect timeout (the give-back's is its 5 s bound).
    ids, backend, worker, metrics = gated_worker(
        queue_db, booster, kit, proxy, connect_timeout=10, database_timeout_seconds=30.0
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        silence_once_claimed(backend, proxy)
        kit.wait_until(proxy.pending, 30, "the write to wait on the silent database")
        opened = proxy.accepted
        worker.stop()
        if answers:
            kit.wait_until(
                lambda: proxy.accepted > opened, 20, "a last attempt to give the batch back"
            )
            proxy.cut(opened)  # the write died with its connection; the give-back gets through
            proxy.resume()
        # Well under the 30 s database timeout it took before (plus the give-back's ~10 s).
        thread.join(20)
        assert not thread.is_alive(), "the worker did not stop within 20 s"
    finally:
        worker.stop()
        proxy.close()
        thread.join(60)
    rows = kit.query(queue_db, "SELECT status, attempts, error FROM scoring_jobs ORDER BY id")
    assert len(rows) == len(ids)
    assert "gave no answer within 3 s of the worker's stop" in caplog.text
    assert "giving back 6 claimed jobs as it stops" in caplog.text
    assert sample(metrics, "paylater_worker_database_errors_total", reason="no_answer") >= 1
    if answers:
        assert rows == [("queued", 0, GIVEN_BACK)] * len(ids)
        assert sample(metrics, "paylater_worker_jobs_held_total") == len(ids)
    else:
        assert [r[:2] for r in rows] == [("running", 1)] * len(ids), rows
        assert "could not give back 6 claimed jobs on shutdown" in caplog.text


@pytest.mark.timeout(240)
def test_the_notify_listener_s_failed_reconnects_are_counted(
    queue_db: str, proxy: BlackHoleProxy, silent_after: float, kit: Any
) -> None:
    """The listener's reconnects that failed were only logged: a worker whose NOTIFY connection
    could not be made (loops left on their poll) showed no database error at all."""
    from worker.metrics import WorkerMetrics
    from worker.runner import Worker, WorkerConfig

    config = WorkerConfig.from_settings(concurrency=1, poll_seconds=0.2)
    metrics = WorkerMetrics()
    worker = Worker(through(queue_db, proxy), _NeverCalled(), config, metrics=metrics)
    proxy.silence()
    # The listener alone (no loop runs): every error counted is one of its reconnects.
    listener = threading.Thread(target=worker._listen, daemon=True)
    listener.start()
    try:
        kit.wait_until(
            lambda: (
                sample(metrics, "paylater_worker_database_errors_total", reason="no_answer") >= 2
            ),
            60,
            "two failed listener reconnects to be counted",
        )
    finally:
        worker.stop()
        listener.join(30)
    assert sample(metrics, "paylater_worker_database_errors_total", reason="error") == 0
    assert worker.totals.database_errors >= 2
