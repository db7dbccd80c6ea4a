"""The worker loop: claim a batch, score it, write results and job states in one round trip."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from worker import queue
from worker.scoring import (
    BackendTimeout,
    BackendUnavailable,
    InvalidRequest,
    Outcome,
    ScoreOutcome,
    ScoreRequest,
    ScoringBackend,
    parse_request,
)

if TYPE_CHECKING:
    import psycopg

    from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

HUNG = "hangs the backend while it answers other requests"
"""In the error of a job found hanging the backend; alone in a later batch, it is still blamed."""


class Claim:
    """A claimed batch's lease: until when the worker may still act on it, and its renewal."""

    def __init__(self, conn: psycopg.Connection[Any], jobs: Sequence[queue.Job], seconds: float):
        self.conn, self.jobs, self.seconds = conn, jobs, seconds
        # A margin for writing the results before the lease runs out.
        self.deadline = time.monotonic() + 0.8 * seconds
        # The renewal failure that closed the connection: the batch's write then fails only with
        # "the connection is closed", which says nothing of what happened (a silent network).
        self.broken: Exception | None = None

    def renew(self) -> None:
        """Extend the lease by its length from now; on failure keep the current deadline. When
        the worker holds none of the jobs any more (another claimed them after the lease ran
        out), the deadline is now: whatever it does with them would be fenced off anyway."""
        renewed_at = time.monotonic()
        try:
            held = queue.extend_lease(self.conn, self.jobs, self.seconds)
        except Exception as exc:
            log.warning("could not renew the lease of a batch of %d: %r", len(self.jobs), exc)
            if self.conn.closed and self.broken is None:
                self.broken = exc
            return
        self.deadline = renewed_at + 0.8 * self.seconds if held else renewed_at


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker claims, retries and waits (defaults: paylater.settings worker_* fields)."""

    batch_size: int = 500
    concurrency: int = 2
    lease_seconds: float = 30.0
    max_attempts: int = 5
    backoff_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    poll_seconds: float = 1.0
    database_timeout_seconds: float = 30.0

    @classmethod
    def from_settings(cls, **overrides: Any) -> WorkerConfig:
        """The settings' values, with any non-None override applied."""
        from paylater.settings import get_settings

        s = get_settings()
        values: dict[str, Any] = {
            "batch_size": s.worker_batch_size,
            "concurrency": s.worker_concurrency,
            "lease_seconds": s.worker_lease_seconds,
            "max_attempts": s.worker_max_attempts,
            "backoff_seconds": s.worker_backoff_seconds,
            "backoff_max_seconds": s.worker_backoff_max_seconds,
            "poll_seconds": s.worker_poll_seconds,
            "database_timeout_seconds": s.worker_database_timeout_seconds,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class Totals:
    """What a worker process did, for its exit line and the tests."""

    claimed: int = 0
    processed: int = 0
    failed: int = 0
    retried: int = 0
    held: int = 0
    dead: int = 0
    lease_lost: int = 0
    batches: int = 0
    database_errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        """Add counts atomically (several loops share one Totals)."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"claimed={self.claimed} processed={self.processed} failed={self.failed} "
            f"retried={self.retried} held={self.held} dead={self.dead} lease_lost={self.lease_lost}"
            f" batches={self.batches} database_errors={self.database_errors}"
        )


class Wakeup:
    """Wake-ups for idle loops: one per notification, so a single new job wakes one loop, not all.

    Pending wake-ups are capped at the number of loops; a wake-up given while every loop is busy
    is kept, so a job inserted during a batch is never left waiting for the poll.
    """

    def __init__(self, cap: int) -> None:
        self._cond = threading.Condition()
        self._pending = 0
        self._cap = cap

    def notify(self, n: int = 1) -> None:
        """Wake up to n idle loops (or the next n that go idle)."""
        with self._cond:
            self._pending = min(self._cap, self._pending + n)
            self._cond.notify(n)

    def notify_all(self) -> None:
        """Wake every loop."""
        self.notify(self._cap)

    def wait(self, timeout: float) -> bool:
        """Take a wake-up, waiting at most timeout; False when none came."""
        with self._cond:
            if not self._pending:
                self._cond.wait(timeout)
            if self._pending:
                self._pending -= 1
                return True
            return False


@dataclass(frozen=True)
class _Silence:
    """A database call that got no answer: within `bound` seconds (None: a connection attempt
    within its connect_timeout), cut short by the worker's stop or not."""

    bound: float | None
    stopping: bool


class Unwritten(Exception):
    """A batch claimed, then not written: the queue connection failed under it."""

    def __init__(self, jobs: Sequence[queue.Job]) -> None:
        super().__init__(f"a batch of {len(jobs)} claimed jobs was not written")
        self.jobs = jobs


SHUTDOWN_GIVE_BACK_SECONDS = 5
"""How long a stopping worker tries to give back a batch it could not write (connecting, then
the statement: at most about twice this): long enough for a database that answers again, short
against a shutdown grace period (Kubernetes: 30 s), which a silent database must not use up."""

GIVEN_BACK = (
    "given back (no attempt spent): the worker lost its queue connection before writing this"
    " attempt"
)
"""The error of a job given back after its batch's write failed with the connection."""


ShadowSource = Callable[[], ScoringBackend | None]
"""Returns the shadow backend to use now (the Staging model), or None when there is none."""


class Worker:
    """Claims and scores jobs on `concurrency` loops until stopped; one NOTIFY listener wakes them."""

    def __init__(
        self,
        url: str,
        backend: ScoringBackend,
        config: WorkerConfig | None = None,
        *,
        shadow: ShadowSource | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.url = queue.require_postgres(url)
        self.backend = backend
        self.config = config or WorkerConfig()
        self.shadow = shadow
        self.metrics = metrics
        self.totals = Totals()
        self.stop_event = threading.Event()
        self.wake = Wakeup(self.config.concurrency)
        self.backend_down = threading.Event()  # the last batch could not reach the backend
        # The last request the backend answered: asked again alone, it tells a backend slow for
        # everyone from one stuck on the requests of a batch with nothing else to compare with.
        self.reference: ScoreRequest | None = None

    # ---- one batch -------------------------------------------------------------------------

    def run_once(self, conn: psycopg.Connection[Any]) -> int:
        """Claim, score and record one batch; returns how many jobs were claimed."""
        return self._run_batch(conn)[0]

    def _run_batch(self, conn: psycopg.Connection[Any]) -> tuple[int, bool]:
        """run_once, also saying whether more jobs are likely due now: the batch was full, or it
        was a job taken back from a dead worker, which is claimed alone (worker/sql/claim.sql)."""
        jobs = queue.claim(conn, self.config.batch_size, self.config.lease_seconds)
        if not jobs:
            return 0, False
        claim = Claim(conn, jobs, self.config.lease_seconds)
        try:
            scored, shadows, failures = self.process(jobs, claim)
            # A single statement is atomic on its own; a transaction only when there are two.
            if failures and scored:
                with conn.transaction():
                    written = queue.finish(conn, scored, shadows)
                    statuses = self._fail(conn, failures)
            else:
                written = queue.finish(conn, scored, shadows)
                statuses = self._fail(conn, failures)
        except Exception as exc:
            if conn.closed:  # the connection failed under the batch: give it back once reconnected
                # The cause is what closed it: a lease renewal's failure, when one came first.
                raise Unwritten(jobs) from claim.broken or exc
            raise
        self._account(jobs, scored, written, failures, statuses)
        unavailable = next((f for f in failures if f.unavailable), None)
        if unavailable is not None:
            if not self.backend_down.is_set():
                # Said once per outage: the jobs only show it in their error column otherwise.
                log.warning(
                    "backend unavailable, jobs held queued (no attempt spent) until it is back: %s",
                    unavailable.error,
                )
            self.backend_down.set()
        elif scored:
            if self.backend_down.is_set():
                log.info("backend reachable again: scoring resumed")
            self.backend_down.clear()
        more = len(jobs) >= self.config.batch_size or any(job.taken_back for job in jobs)
        return len(jobs), more

    def process(
        self, jobs: Sequence[queue.Job], claim: Claim | None = None
    ) -> tuple[list[queue.Scored], list[queue.ShadowScored], list[queue.Failed]]:
        """Validate and score the jobs: (scores, shadow scores, failed attempts). `claim`: their
        lease, renewed while a search for a job that hangs the backend goes on."""
        failures: list[queue.Failed] = []
        requests: list[ScoreRequest] = []
        attempt_of = {job.id: job.attempt for job in jobs}
        for job in jobs:
            if job.attempt > self.config.max_attempts:
                # Claimed again after its worker died on every attempt: dead-letter, do not try again.
                error = job.previous_error or "lease expired"
                failures.append(queue.Failed(job.id, job.attempt, error, permanent=False))
                continue
            try:
                requests.append(parse_request(job))
            except InvalidRequest as exc:
                failures.append(queue.Failed(job.id, job.attempt, f"invalid request: {exc}", True))
        scored: list[queue.Scored] = []
        ok: list[ScoreRequest] = []
        # Jobs already found hanging the backend: alone in a batch, a timeout is still theirs.
        hung = {job.id for job in jobs if job.previous_error and HUNG in job.previous_error}
        outcomes = self.score(self.backend, requests, hung, claim)
        for request, outcome in zip(requests, outcomes, strict=True):
            attempt = attempt_of[request.job_id]
            if isinstance(outcome, ScoreOutcome):
                scored.append(
                    queue.Scored(
                        request.job_id,
                        attempt,
                        outcome.default_probability,
                        outcome.decision,
                        outcome.model_version,
                        outcome.reason_codes,
                    )
                )
                ok.append(request)
            elif isinstance(outcome, InvalidRequest):
                failures.append(
                    queue.Failed(request.job_id, attempt, f"invalid request: {outcome}", True)
                )
            elif isinstance(outcome, BackendUnavailable):
                error = f"scoring failed: BackendUnavailable: {outcome}"
                failures.append(queue.Failed(request.job_id, attempt, error, False, True))
            else:
                error = f"scoring failed: {type(outcome).__name__}: {outcome}"
                failures.append(queue.Failed(request.job_id, attempt, error, False))
        return scored, self.score_shadow(ok), failures

    def score(
        self,
        backend: ScoringBackend,
        requests: Sequence[ScoreRequest],
        hung: AbstractSet[int] = frozenset(),
        claim: Claim | None = None,
        vetted: bool = False,
    ) -> list[Outcome | Exception]:
        """The backend's outcomes; when the batch call fails, halves are retried to isolate the
        job at fault. `hung`: ids of jobs an earlier attempt found hanging the backend; `claim`:
        the batch's lease (None: unbounded); `vetted`: the backend is known not to fail every
        request (these are halves of a batch already checked)."""
        if not requests:
            return []
        started = time.monotonic()
        try:
            outcomes: list[Outcome | Exception] = list(backend.score(requests))
        except BackendUnavailable as exc:
            return [exc] * len(requests)  # nobody's fault: every job retries later
        except BackendTimeout as exc:
            if len(requests) > 1:
                # A user the backend hangs on (its features, say) hangs every job of theirs: kept
                # together, they fall in one half, which the other half's answer then convicts.
                # Users are shuffled anew on each search: two such users split one to each half
                # read as a slow backend, but the next claim most likely puts them together.
                salt = random.getrandbits(32)
                order = sorted(
                    range(len(requests)),
                    key=lambda i: (_mix(requests[i].user_id, salt), requests[i].user_id),
                )
                waited = time.monotonic() - started
                found = self.isolate_timeout(
                    backend, [requests[i] for i in order], hung, claim, waited
                )
                by_position = dict(zip(order, found, strict=True))
                return [by_position[i] for i in range(len(requests))]
            if requests[0].job_id in hung:
                return [BackendTimeout(f"{exc}; the job {HUNG} on an earlier attempt")]
            answered = self.reference_answers(backend, requests, claim, time.monotonic() - started)
            if answered is not None:
                log.warning("job %s hangs the backend: %s", requests[0].job_id, exc)
                return [BackendTimeout(f"{exc}; the job {HUNG} ({answered})")]
            # Nothing answered beside it, so nothing tells a slow backend from a request it hangs
            # on: the job waits, no attempt spent, until it is claimed with others.
            return [
                BackendUnavailable(
                    f"{exc}; nothing else answered to compare with (no other job in the batch,"
                    " and no earlier request answered again)"
                )
            ]
        except Exception as exc:
            if not vetted and (broken := self.fails_everyone(backend, requests, exc)) is not None:
                return [broken] * len(requests)  # the backend's fault: every job waits
            if len(requests) == 1:
                log.warning("job %s failed to score: %r", requests[0].job_id, exc)
                return [exc]
            middle = len(requests) // 2
            return self.score(backend, requests[:middle], hung, claim, True) + self.score(
                backend, requests[middle:], hung, claim, True
            )
        return self._answered(outcomes, requests)

    def fails_everyone(
        self, backend: ScoringBackend, requests: Sequence[ScoreRequest], error: Exception
    ) -> BackendUnavailable | None:
        """After `requests` failed with `error`: BackendUnavailable when the last request the
        backend answered (another user's), asked again alone, fails too (a bad deploy answering
        500 to everything: split down, every job would spend its attempts and be dead-lettered);
        None when it is answered, or there is no such request yet (the batch is then searched)."""
        reference = self.reference
        if reference is None or reference.user_id in {r.user_id for r in requests}:
            return None
        try:
            _checked(list(backend.score([reference])), [reference])
        except BackendTimeout:
            return None  # slow, not failing: the search tells
        except Exception as again:
            return BackendUnavailable(
                f"the scoring backend fails every request: {type(error).__name__}: {error};"
                f" user {reference.user_id}'s request, answered before, fails too ({again})"
            )
        return None

    def _answered(
        self, outcomes: list[Outcome | Exception], requests: Sequence[ScoreRequest]
    ) -> list[Outcome | Exception]:
        """A backend's answer to `requests`, checked; one of them it scored becomes the reference."""
        outcomes = _checked(outcomes, requests)
        scored = next(
            (r for r, o in zip(requests, outcomes, strict=True) if isinstance(o, ScoreOutcome)),
            None,
        )
        if scored is not None:
            self.reference = scored
        return outcomes

    def reference_answers(
        self,
        backend: ScoringBackend,
        requests: Sequence[ScoreRequest],
        claim: Claim | None,
        waited: float,
    ) -> str | None:
        """Ask the backend the last request it answered (another user's), alone, after `requests`
        got no answer in `waited` seconds: how it was answered, or None when it was not (slow
        for everyone), when there is no such request yet, or when the lease leaves no time."""
        reference = self.reference
        if reference is None or reference.user_id in {r.user_id for r in requests}:
            return None
        if claim is not None:
            claim.renew()
            if time.monotonic() + waited > claim.deadline:
                return None
        try:
            _checked(list(backend.score([reference])), [reference])
        except Exception:
            return None
        return f"user {reference.user_id}'s request, asked alone, was answered"

    def isolate_timeout(
        self,
        backend: ScoringBackend,
        requests: Sequence[ScoreRequest],
        hung: AbstractSet[int] = frozenset(),
        claim: Claim | None = None,
        waited: float = 0.0,
        answered: bool = False,
    ) -> list[Outcome | Exception]:
        """Outcomes of a batch the backend gave no answer to in time (after `waited` seconds).

        Each half is tried once. When one answers, the hang is in the other, which is split the
        same way down to the request at fault; that one alone spends an attempt (and is
        dead-lettered after max_attempts). When neither answers in time, the last request the
        backend answered (another user's) is asked again alone: answered, the backend is stuck on
        this batch, so both halves are searched (a batch of one user's jobs is blamed whole); not
        answered, or with no such request yet, the backend is slow for everyone: every job waits,
        no attempt spent. Finding it costs about 2 log2(n) calls, and a slow backend costs 3
        (4 once a reference request exists), where before every batch holding the job was given back as an outage,
        forever. The claim's lease is renewed before each step; when two more such waits would
        outlast it, the batch is given back (no attempt spent) and the search goes on with the
        next claims.

        `answered`: the step before answered this batch's sibling half, so when neither half of
        this one answers the service is not slow for everyone: each half holds a request it hangs
        on (two jobs of one user, say), and both are searched, as any half with no answer."""
        if claim is not None:
            claim.renew()
        if claim is not None and time.monotonic() + 2 * waited > claim.deadline:
            log.warning(
                "a batch of %d got no answer in time and the claim's lease leaves no time to try"
                " its halves: given back (a lease of several backend timeouts lets the worker find"
                " the job at fault)",
                len(requests),
            )
            error = BackendUnavailable(f"no answer in {waited:.1f} s to a batch of {len(requests)}")
            return [error] * len(requests)
        middle = _user_boundary(requests)
        halves = [requests[:middle], requests[middle:]]
        tried: list[list[Outcome | Exception] | BackendTimeout | None] = []
        for half in halves:
            started = time.monotonic()
            try:
                tried.append(list(backend.score(half)))
            except BackendUnavailable as exc:
                return [exc] * len(requests)  # gone altogether: nobody's fault
            except BackendTimeout as exc:
                tried.append(exc)
                waited = time.monotonic() - started
            except Exception:
                tried.append(None)  # it answered, with an error: split below as any other error
        none_answered = all(isinstance(t, BackendTimeout) for t in tried)
        if none_answered and not answered:
            meanwhile = self.reference_answers(backend, requests, claim, waited)
            if meanwhile is None:
                error = BackendUnavailable(
                    f"no answer in time to a batch of {len(requests)} nor to either half of it:"
                    f" slow for everyone ({tried[0]})"
                )
                # Jobs an earlier attempt singled out are not cleared by it: they spend an
                # attempt, or a batch of only them (one user's) would be given back forever.
                return [
                    BackendTimeout(f"{tried[0]}; the job {HUNG} on an earlier attempt")
                    if r.job_id in hung
                    else error
                    for r in requests
                ]
            if len({r.user_id for r in requests}) == 1:
                # One user's jobs only, and another user's request is answered: the backend is
                # stuck on this user (their features, say). Every job of theirs spends an attempt
                # at once, rather than a wait per job to split them down one by one.
                log.warning(
                    "user %s's %d jobs hang the backend: %s",
                    requests[0].user_id,
                    len(requests),
                    meanwhile,
                )
                return [BackendTimeout(f"{tried[0]}; the job {HUNG} ({meanwhile})")] * len(requests)
        outcomes: list[Outcome | Exception] = []
        for half, result in zip(halves, tried, strict=True):
            if isinstance(result, BackendTimeout):
                if len(half) > 1:
                    outcomes += self.isolate_timeout(
                        backend, half, hung, claim, waited, not none_answered
                    )
                else:
                    log.warning("job %s hangs the backend: %s", half[0].job_id, result)
                    outcomes.append(BackendTimeout(f"{result}; the job {HUNG}"))
            elif result is None:
                outcomes += self.score(backend, half, hung, claim)
            else:
                outcomes += self._answered(result, half)
        return outcomes

    def score_shadow(self, requests: Sequence[ScoreRequest]) -> list[queue.ShadowScored]:
        """The shadow model's scores of the primary's successes; its failures never touch the jobs."""
        backend = self._shadow_backend()
        if backend is None or not requests:
            return []
        try:
            outcomes = backend.score(requests)
        except Exception as exc:
            log.warning("shadow model %s failed on a batch: %r", backend.model_version, exc)
            if self.metrics:
                self.metrics.shadow_failed.inc()
            return []
        return [
            queue.ShadowScored(r.job_id, o.model_version, o.default_probability, o.decision)
            for r, o in zip(requests, outcomes, strict=True)
            if isinstance(o, ScoreOutcome)
        ]

    def _shadow_backend(self) -> ScoringBackend | None:
        """The current shadow backend; a failing lookup means no shadow this batch."""
        if self.shadow is None:
            return None
        try:
            return self.shadow()
        except Exception as exc:
            log.warning("shadow model unavailable: %r", exc)
            return None

    def _fail(self, conn: psycopg.Connection[Any], failures: list[queue.Failed]) -> dict[int, str]:
        """Record failed attempts with this worker's retry policy."""
        return queue.fail(
            conn,
            failures,
            max_attempts=self.config.max_attempts,
            backoff_seconds=self.config.backoff_seconds,
            backoff_max_seconds=self.config.backoff_max_seconds,
        )

    def _account(
        self,
        jobs: Sequence[queue.Job],
        scored: Sequence[queue.Scored],
        written: Sequence[int],
        failures: Sequence[queue.Failed],
        statuses: dict[int, str],
    ) -> None:
        """Update totals and metrics after a batch committed."""
        # Held: given back for a backend that could not be reached, no attempt spent; not a
        # failed attempt (the failure-rate alerts would read an outage as 100 % failures).
        unavailable = {f.job_id for f in failures if f.unavailable}
        held = sum(1 for job_id, status in statuses.items() if job_id in unavailable)
        new_status = [status for job_id, status in statuses.items() if job_id not in unavailable]
        lost = len(scored) - len(written) + len(failures) - len(statuses)
        counts = {
            "claimed": len(jobs),
            "processed": len(written),
            "failed": new_status.count("failed"),
            "retried": new_status.count("queued"),
            "held": held,
            "dead": new_status.count("dead"),
            "lease_lost": lost,
            "batches": 1,
        }
        self.totals.add(**counts)
        if lost:
            log.warning("%d jobs of this batch had been re-claimed by another worker", lost)
        m = self.metrics
        if m is None:
            return
        m.batch_size.observe(len(jobs))
        m.processed.inc(len(written))
        m.failed.labels("invalid").inc(counts["failed"])
        m.failed.labels("error").inc(counts["retried"] + counts["dead"])
        m.dead_lettered.inc(counts["dead"])
        m.held.inc(held)
        m.lease_lost.inc(lost)
        now = datetime.now(UTC)
        created = {job.id: job.created_at for job in jobs}
        for job_id in written:
            m.latency.observe((now - created[job_id]).total_seconds())

    # ---- the loops -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask every loop to finish the batch in hand and return."""
        self.stop_event.set()
        self.wake.notify_all()

    def run(self) -> Totals:
        """Run the loops and the listener until stop(); returns the totals."""
        threads = [
            threading.Thread(target=self._listen, name="notify-listener", daemon=True),
            *(
                threading.Thread(target=self.loop, name=f"worker-{i}")
                for i in range(self.config.concurrency)
            ),
        ]
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join()
        log.info("worker stopped: %s", self.totals.summary())
        return self.totals

    def loop(self) -> None:
        """Claim batches until stopped; idle, wait for a NOTIFY or the poll interval."""
        conn: psycopg.Connection[Any] | None = None
        unwritten: Sequence[queue.Job] = ()  # claimed, then cut off from the database
        try:
            while not self.stop_event.is_set():
                try:
                    if conn is None or conn.closed:
                        # A stop cuts a call waiting on a silent database short, so the batch can
                        # still be given back within a shutdown grace period.
                        conn = queue.connect(
                            self.url,
                            answer_timeout=self.config.database_timeout_seconds,
                            stopping=self.stop_event,
                        )
                        if unwritten:
                            self._give_back(conn, unwritten)
                            unwritten = ()
                        if self.stop_event.is_set():
                            break  # stopped while reconnecting: claim nothing new
                    _, more = self._run_batch(conn)
                except Exception as exc:
                    # The database went away, went silent or a statement failed. A batch cut off
                    # is given back once the database answers again (else its leases run out and
                    # another attempt picks it up). Back off, reconnect, go on.
                    if isinstance(exc, Unwritten):
                        unwritten = exc.jobs
                    self._database_failed(exc)
                    if conn is not None:
                        conn.close()
                    conn = None
                    self.stop_event.wait(min(self.config.poll_seconds, 1.0))
                    continue
                if self.backend_down.is_set():
                    # Jobs given back cost no attempt: pause, or a backlog would be claimed and
                    # given back as fast as the database allows for the length of the outage.
                    self.stop_event.wait(self.config.poll_seconds)
                elif more:
                    # A full batch, or a job taken back from a dead worker (claimed alone, the
                    # rest of its batch likely due too): claim again at once, with an idle peer.
                    self.wake.notify()
                else:
                    self.wake.wait(self.config.poll_seconds)
        finally:
            if conn is not None:
                conn.close()
            if unwritten:
                self._give_back_on_exit(unwritten)

    def _give_back_on_exit(self, jobs: Sequence[queue.Job]) -> None:
        """One last attempt, bounded by SHUTDOWN_GIVE_BACK_SECONDS, to give back a batch cut off
        from the database as the worker stops; else its jobs wait for their lease to run out."""
        bound = SHUTDOWN_GIVE_BACK_SECONDS
        deadline = time.monotonic() + bound
        try:
            with queue.connect(self.url, answer_timeout=bound, connect_timeout=bound) as conn:
                # Connecting took part of the bound: the statement gets what is left of it.
                conn.answer_timeout = max(0.5, deadline - time.monotonic())  # type: ignore[attr-defined]
                self._give_back(conn, jobs)
        except Exception as exc:
            until = datetime.now(UTC) + timedelta(seconds=self.config.lease_seconds)
            log.warning(
                "could not give back %d claimed jobs on shutdown (%r): another worker takes them"
                " once their lease runs out, by %s",
                len(jobs),
                exc,
                until.isoformat(timespec="seconds"),
            )

    def _database_failed(self, exc: BaseException) -> None:
        """Log a failed batch or reconnect; count a database failure, naming a silent one."""
        cause = exc.__cause__ if isinstance(exc, Unwritten) else exc
        silent = self._count_database_error(cause)
        if silent is not None:
            jobs = len(exc.jobs) if isinstance(exc, Unwritten) else 0
            # A stop cuts a reconnect short too (psycopg.errors.ConnectionTimeout then).
            stopping = silent.stopping or self.stop_event.is_set()
            then = (
                f"giving back {jobs} claimed jobs as it stops"
                if stopping
                else "reconnecting" + (f", then giving back {jobs} claimed jobs" if jobs else "")
            )
            log.error(
                "the queue database gave no answer %s (network silent? host failed over?); %s: %s",
                f"to a connection attempt {'cut short by the stop' if stopping else 'within its connect_timeout'}"
                if silent.bound is None
                else f"within {silent.bound:g} s"
                + (" of the worker's stop" if silent.stopping else ""),
                then,
                cause,
            )
        else:
            log.exception("batch failed; reconnecting: %r", exc)

    def _count_database_error(self, cause: BaseException | None) -> _Silence | None:
        """Count `cause` when it is a database failure (reason no_answer when the database was
        silent); returns how long it was silent for, or None when it was not."""
        import psycopg

        from paylater.postgres import NoAnswer

        silent: _Silence | None = None
        if isinstance(cause, psycopg.errors.ConnectionTimeout):
            # A reconnect whose connect_timeout ran out met the same silence as a call that did.
            silent = _Silence(None, False)
        else:
            answer = cause if isinstance(cause, NoAnswer) else cause and cause.__context__
            if isinstance(answer, NoAnswer):
                silent = _Silence(answer.bound, answer.stopping)
        if silent is not None or isinstance(cause, psycopg.Error):
            self.totals.add(database_errors=1)
            if self.metrics:
                self.metrics.database_errors.labels("no_answer" if silent else "error").inc()
        return silent

    def _give_back(self, conn: psycopg.Connection[Any], jobs: Sequence[queue.Job]) -> None:
        """Requeue jobs this worker claimed and could not write, no attempt spent (fenced: jobs
        written after all, or re-claimed by another worker, are left alone)."""
        failures = [queue.Failed(j.id, j.attempt, GIVEN_BACK, False, True) for j in jobs]
        statuses = self._fail(conn, failures)
        self.totals.add(held=len(statuses))
        if self.metrics:
            self.metrics.held.inc(len(statuses))
        log.warning(
            "database answering again: %d of %d jobs cut off before their write given back"
            " (the others were written or re-claimed meanwhile)",
            len(statuses),
            len(jobs),
        )

    def _listen(self) -> None:
        """LISTEN for new jobs and wake the loops; polling covers the gaps while reconnecting."""
        while not self.stop_event.is_set():
            try:
                # Keepalives find a silent network under an idle LISTEN (notifies then raises).
                timeout = self.config.database_timeout_seconds
                with queue.connect(self.url, answer_timeout=timeout) as conn:
                    conn.execute(f"LISTEN {queue.NOTIFY_CHANNEL}")
                    while not self.stop_event.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self.wake.notify()
            except Exception as exc:
                # Counted too: a listener that cannot reconnect leaves the loops on their poll.
                self._count_database_error(exc)
                log.warning("NOTIFY listener lost its connection (%r); polling meanwhile", exc)
                self.stop_event.wait(1.0)


def _checked(
    outcomes: list[Outcome | Exception], requests: Sequence[ScoreRequest]
) -> list[Outcome | Exception]:
    """A backend's outcomes, refused when there is not one per request."""
    if len(outcomes) != len(requests):
        raise RuntimeError(
            f"backend returned {len(outcomes)} outcomes for {len(requests)} requests"
        )
    return outcomes


def _mix(user_id: int, salt: int) -> int:
    """A 32-bit shuffle of a user id under `salt` (multiplicative hashing)."""
    return ((user_id ^ salt) * 0x9E3779B1) & 0xFFFFFFFF


def _user_boundary(requests: Sequence[ScoreRequest]) -> int:
    """Where to split requests grouped by user into halves: the change of user nearest the
    middle, so no user's jobs straddle the halves (the middle itself when there is one user)."""
    middle = len(requests) // 2
    for distance in range(middle + 1):
        for cut in (middle - distance, middle + distance):
            if 0 < cut < len(requests) and requests[cut - 1].user_id != requests[cut].user_id:
                return cut
    return middle
