"""`paylater worker` and `paylater enqueue`: the asynchronous scoring worker."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, get_args

import typer

from worker.scoring import Outcome, ScoreRequest, ScoringBackend

log = logging.getLogger(__name__)

SHADOW_REFRESH_SECONDS = 60.0
"""How often the worker asks the registry which version is in Staging."""

MODEL_REFRESH_SECONDS = 60.0
"""How often a worker scoring an alias (production, staging) asks the registry what it names."""

ALIASES = ("production", "staging")


def _choices(values: Sequence[str]) -> str:
    """'a' or 'b' (the wording pydantic uses for the settings)."""
    quoted = [repr(v) for v in values]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def load_scorer(spec: str) -> Any:
    """A Scorer for 'production', 'staging', a registry version, or a model store tag (name:version)."""
    from bentos.scoring import Scorer

    if ":" in spec:
        return Scorer.from_store(spec)
    if spec.strip().isdigit():
        return Scorer.load(version=spec.strip())
    return Scorer.load(stage=spec.strip().lower())


def inprocess_backend(
    spec: str, database_url: str, reason_codes: str = "declines"
) -> ScoringBackend:
    """The model `spec` scored in this process with features from user_features_latest."""
    from paylater.settings import get_settings
    from worker.scoring import InProcessBackend

    scorer = load_scorer(spec)
    table = get_settings().online_features_table
    return InProcessBackend(scorer, database_url, reason_codes, table)


def connect_or_exit(db_url: str) -> Any:
    """A connection to the queue database; one error line and exit 1 when it cannot be reached."""
    import psycopg

    from paylater.redaction import redact
    from worker.queue import connect

    try:
        return connect(db_url)
    except psycopg.Error as exc:  # unreachable, refused, or a URL libpq cannot parse
        # libpq quotes a URL it cannot parse whole, password included: redacted here.
        reason = redact(" ".join(str(exc).split()))
        typer.echo(f"error: cannot reach the queue database {redact(db_url)}: {reason}", err=True)
        raise typer.Exit(1) from exc


def feature_database(source_url: str, queue_db_url: str) -> str:
    """Where an in-process worker reads user_features_latest: the source database, which the
    feature build publishes it to, when that is PostgreSQL; else (the embedded SQLite source of
    `make demo`) the queue database, where an operator must provide it."""
    from worker.queue import NotPostgres, require_postgres

    try:
        return require_postgres(source_url)
    except NotPostgres:
        return queue_db_url


def resolve_shadow_version(spec: str) -> str | None:
    """The registry version (or store tag) `spec` names now; None when it names nothing."""
    if ":" in spec or spec.strip().isdigit():
        return spec.strip()
    from bentos.build import resolve_version

    try:
        return resolve_version(spec)  # asks the tracking server's /health first
    except Exception as exc:  # no alias 'staging' is the normal state between candidates
        log.debug("no %s version: %r", spec, exc)
        return None


class FollowingBackend:
    """The in-process backend of the version an alias names, re-resolved every
    MODEL_REFRESH_SECONDS: a promotion or a rollback reaches running workers within that time,
    without a restart.

    The new version is loaded before it replaces the old one, which keeps scoring meanwhile; a
    registry that cannot be asked, or an alias naming nothing, keeps the current version (with a
    warning). A replaced backend is closed once no loop scores with it any more: a batch that
    took it before the swap finishes with it, however long it takes.
    """

    def __init__(
        self, spec: str, database_url: str, reason_codes: str, current: ScoringBackend
    ) -> None:
        self.spec = spec
        self.database_url = database_url
        self.reason_codes = reason_codes
        self._current = current
        self._retired: list[ScoringBackend] = []
        self._in_use: dict[int, int] = {}  # id(backend) -> batches scoring with it now
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._refreshing = False

    @property
    def model_version(self) -> str:
        """The version scoring now."""
        return self._current.model_version

    def score(self, requests: Sequence[ScoreRequest]) -> list[Outcome]:
        """Score with the version the alias names (checked at most every MODEL_REFRESH_SECONDS).

        The loop whose batch finds a check due asks the registry and loads a new version outside
        the lock; the other loops go on scoring with the current one meanwhile.
        """
        with self._lock:
            due = not self._refreshing and time.monotonic() - self._checked >= MODEL_REFRESH_SECONDS
            if due:
                self._refreshing, self._checked = True, time.monotonic()
        if due:
            try:
                self._refresh()
            finally:
                with self._lock:
                    self._refreshing = False
        with self._lock:
            backend = self._current
            self._in_use[id(backend)] = self._in_use.get(id(backend), 0) + 1
        try:
            return backend.score(requests)
        finally:
            with self._lock:
                self._in_use[id(backend)] -= 1
                if not self._in_use[id(backend)]:
                    del self._in_use[id(backend)]
                self._close_retired()

    def _close_retired(self) -> None:
        """Close the replaced backends no batch is scoring with (the lock held)."""
        idle = [b for b in self._retired if id(b) not in self._in_use]
        self._retired = [b for b in self._retired if id(b) in self._in_use]
        for old in idle:
            old.close()

    def _refresh(self) -> None:
        """Load the version the alias names now, when it changed, and swap it in."""
        current = self.model_version
        try:
            from bentos.build import resolve_version

            version = resolve_version(self.spec)  # asks the tracking server's /health first
        except Exception as exc:
            log.warning(
                "model %s not resolvable (%r): still scoring with version %s",
                self.spec,
                exc,
                current,
            )
            return
        if version == current:
            return
        try:
            backend = inprocess_backend(version, self.database_url, self.reason_codes)
        except Exception as exc:
            log.warning(
                "model version %s (%s) not loadable (%r): still scoring with version %s",
                version,
                self.spec,
                exc,
                current,
            )
            return
        log.info(
            "%s now names version %s: scoring with it instead of %s", self.spec, version, current
        )
        with self._lock:
            self._retired.append(self._current)
            self._current = backend
            self._close_retired()

    def close(self) -> None:
        """Close the current backend and any replaced one."""
        with self._lock:
            for backend in [*self._retired, self._current]:
                backend.close()
            self._retired.clear()


class ShadowLoader:
    """The shadow backend for the version `spec` names, re-resolved every SHADOW_REFRESH_SECONDS.

    `primary_version`: the version the worker scores with, or a callable giving it (a worker that
    follows an alias changes it); the shadow is off while it is the same version.

    Asking the registry and loading a model take seconds: they run on a thread of their own, so a
    scoring loop asking for the shadow gets the current one (or none) at once, and the new one
    once it is loaded. A version that fails to load leaves the current shadow in place (with a
    warning) and is tried again at the next refresh.
    """

    def __init__(
        self, spec: str, primary_version: str | Callable[[], str], database_url: str
    ) -> None:
        self.spec = spec
        self._primary = primary_version
        self.database_url = database_url
        self._lock = threading.Lock()  # the scoring loops take it: never held for I/O
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._checked = -float("inf")
        self._refreshing = False
        self._version: str | None = None  # what the spec resolved to: a version or a store tag
        self._model_version: str | None = None  # the model version that loads as, once known
        self._backend: ScoringBackend | None = None
        self._loaded: str | None = None  # what the spec resolved to when _backend was loaded

    @property
    def primary_version(self) -> str:
        """The version the worker scores with now."""
        return self._primary() if callable(self._primary) else self._primary

    @property
    def current(self) -> ScoringBackend | None:
        """The shadow backend now, without asking the registry; none while the primary scores
        the same version."""
        with self._lock:
            backend = self._backend
        if backend is not None and backend.model_version == self.primary_version:
            return None
        return backend

    def __call__(self) -> ScoringBackend | None:
        """The current shadow backend, or None; starts a refresh beside the caller when one is due."""
        with self._lock:
            due = (
                not self._refreshing and time.monotonic() - self._checked >= SHADOW_REFRESH_SECONDS
            )
            if due:
                self._refreshing, self._checked = True, time.monotonic()
        if due:
            threading.Thread(
                target=self._refresh_beside, name="shadow-refresh", daemon=True
            ).start()
        return self.current

    def _refresh_beside(self) -> None:
        """refresh(), on the refresh thread: an error is logged, never raised."""
        try:
            self.refresh()
        except Exception as exc:
            log.warning("shadow model %s: refresh failed (%r)", self.spec, exc)
        finally:
            with self._lock:
                self._refreshing = False

    def refresh(self) -> None:
        """Resolve the spec now and load the version it names when it changed (the caller waits
        for the load; the scoring loops do not).

        What is compared with the primary is the model version the spec loads as: a registry
        version is its own, a store tag's is known once loaded (and kept while the tag stays),
        so a shadow put aside while the primary scored its version comes back when the primary
        moves away, and steps aside again when the primary moves to it.
        """
        with self._refresh_lock:
            version = resolve_shadow_version(self.spec)
            if version != self._version:
                self._version = version
                self._model_version = None if version is None or ":" in version else version
            if version is None or self._model_version == self.primary_version:
                self._swap(None, None)  # nothing to shadow, or the primary scores it
                return
            if self._loaded == version:
                return
            try:
                backend = inprocess_backend(version, self.database_url)
            except Exception as exc:
                log.warning(
                    "shadow model %s (%s) not loadable (%r): still shadowing with %s",
                    version,
                    self.spec,
                    exc,
                    self._backend.model_version if self._backend else "none",
                )
                return
            self._model_version = backend.model_version
            if backend.model_version == self.primary_version:
                backend.close()
                self._swap(None, None)
                return
            log.info("shadow scoring with model version %s", backend.model_version)
            self._swap(backend, version)

    def _swap(self, backend: ScoringBackend | None, loaded: str | None) -> None:
        """Make `backend` the shadow (loaded for what the spec resolved to) and close the old one."""
        with self._lock:
            old, self._backend, self._loaded = self._backend, backend, loaded
        if old is not None and old is not backend:
            old.close()


def run_worker(
    concurrency: int = typer.Option(
        None, min=1, help="Claim-score-write loops (threads) in this process."
    ),
    batch_size: int = typer.Option(None, min=1, help="Jobs claimed per round trip."),
    backend: str = typer.Option(
        None, help="'inprocess' (model store) or 'http' (the bento); any letter case."
    ),
    url: str = typer.Option(None, help="Bento base URL for --backend http."),
    model: str = typer.Option(None, help="production | staging | <version> | <store tag>."),
    shadow_model: str = typer.Option(
        None, help="Shadow model (default 'staging'); '' disables. In process only."
    ),
    reason_codes: str = typer.Option(
        None,
        help="In process: 'declines' (TreeSHAP only for declines) or 'all' (like the HTTP API).",
    ),
    metrics_port: int = typer.Option(None, help="Serve Prometheus /metrics on this port."),
    metrics_host: str = typer.Option("0.0.0.0", help="Address of the metrics server."),
    lease_seconds: float = typer.Option(None, help="Lease of a claimed batch (crash recovery)."),
    max_attempts: int = typer.Option(None, min=1, help="Attempts before dead-lettering."),
    poll_seconds: float = typer.Option(None, help="Idle poll interval (NOTIFY wakes sooner)."),
    database_url: str = typer.Option(None, help="Queue database (default: settings)."),
) -> None:
    """Score queued jobs until SIGTERM/SIGINT, which finishes the batch in hand first."""
    from paylater.settings import ReasonCodeMode, WorkerBackend, get_settings
    from worker.metrics import WorkerMetrics, serve_metrics
    from worker.queue import NotPostgres, ensure_schema, queue_url, require_postgres
    from worker.runner import ShadowSource, Worker, WorkerConfig
    from worker.scoring import HttpBackend

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # httpx says every request it sends at INFO: a line per batch. The worker says what failed.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # The settings refuse such values; their command-line overrides must too (--max-attempts 0
    # dead-lettered every job unscored). The integer options are bounded by typer (min=1).
    for option, seconds in (("--lease-seconds", lease_seconds), ("--poll-seconds", poll_seconds)):
        if seconds is not None and not seconds > 0:
            typer.echo(f"error: {option} must be more than 0 seconds, got {seconds:g}", err=True)
            raise typer.Exit(2)
    settings = get_settings()
    try:
        db_url = require_postgres(database_url, "--database-url") if database_url else queue_url()
    except NotPostgres as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    config = WorkerConfig.from_settings(
        concurrency=concurrency,
        batch_size=batch_size,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
        poll_seconds=poll_seconds,
    )
    # The same choices, in any letter case, as PAYLATER_WORKER_BACKEND/_REASON_CODES accept.
    kind = (backend or settings.worker_backend).strip().lower()
    backends = get_args(WorkerBackend)
    if kind not in backends:
        typer.echo(f"error: --backend must be one of {_choices(backends)}, got {kind!r}", err=True)
        raise typer.Exit(2)
    shadow: ShadowSource | None = None
    scoring: ScoringBackend
    if kind == "http":
        scoring_url = url or settings.worker_scoring_url
        if not scoring_url:
            typer.echo("--backend http needs --url (or PAYLATER_WORKER_SCORING_URL)", err=True)
            raise typer.Exit(2)
        timeout = settings.worker_scoring_timeout_seconds
        scoring = HttpBackend(
            scoring_url,
            token=settings.api_token,
            max_batch=settings.serve_max_batch,
            timeout_seconds=timeout,
        )
        if config.lease_seconds < 3 * timeout:
            log.warning(
                "lease %.0f s is under three scoring timeouts (%.0f s): a batch holding a request"
                " the service hangs on is given back instead of searched"
                " (PAYLATER_WORKER_LEASE_SECONDS, PAYLATER_WORKER_SCORING_TIMEOUT_SECONDS)",
                config.lease_seconds,
                timeout,
            )
    else:  # "inprocess"
        reasons = (reason_codes or settings.worker_reason_codes).strip().lower()
        if reasons not in get_args(ReasonCodeMode):
            modes = _choices(get_args(ReasonCodeMode))
            typer.echo(f"error: --reason-codes must be one of {modes}, got {reasons!r}", err=True)
            raise typer.Exit(2)
        model_spec = model or settings.worker_model
        features_db = feature_database(settings.source, db_url)
        from bentos.cli import load_or_exit

        scoring = load_or_exit(
            model_spec, lambda: inprocess_backend(model_spec, features_db, reasons)
        )
        if model_spec.strip().lower() in ALIASES:
            scoring = FollowingBackend(model_spec.strip().lower(), features_db, reasons, scoring)
        spec = settings.worker_shadow_model if shadow_model is None else shadow_model
        if spec:
            primary = scoring
            shadow_loader = ShadowLoader(spec, lambda: primary.model_version, features_db)
            shadow_loader()  # starts loading the shadow while the worker starts
            shadow = shadow_loader

    with connect_or_exit(db_url) as conn:
        ensure_schema(conn)
    metrics = WorkerMetrics()
    port = metrics_port if metrics_port is not None else settings.worker_metrics_port
    if port is not None:
        try:
            serve_metrics(metrics, db_url, port, metrics_host)
        except OSError as exc:  # taken (another worker on this host), or not an address here
            typer.echo(
                f"error: cannot serve metrics on {metrics_host}:{port}: {exc.strerror or exc}"
                " (--metrics-port, PAYLATER_WORKER_METRICS_PORT)",
                err=True,
            )
            scoring.close()
            raise typer.Exit(1) from exc
        log.info("metrics on http://%s:%d/metrics", metrics_host, port)
    worker = Worker(db_url, scoring, config, shadow=shadow, metrics=metrics)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    log.info(
        "worker started: model %s, %d loops x %d jobs, lease %.0fs",
        scoring.model_version,
        config.concurrency,
        config.batch_size,
        config.lease_seconds,
    )
    totals = worker.run()
    scoring.close()
    typer.echo(f"worker stopped: {totals.summary()}", err=True)


def enqueue(
    user_id: int = typer.Option(..., help="The user asking to defer a top-up."),
    amount_jpy: int = typer.Option(
        ..., help="Requested amount in yen, within paylater.product's limits (1000..100000)."
    ),
    idempotency_key: str = typer.Option(
        None, help="Same key, same job (safe to retry); at most 255 characters."
    ),
    wait: bool = typer.Option(False, help="Wait for the job to finish and print its result."),
    timeout: float = typer.Option(30.0, help="Seconds --wait waits."),
    database_url: str = typer.Option(None, help="Queue database (default: settings)."),
) -> None:
    """Enqueue one scoring job and print its id (and, with --wait, its result as JSON)."""
    from worker import queue

    # Refused before connecting: out of range, the insert crashed (bigint, index row size) or
    # queued a job the worker can only fail.
    try:
        queue.check_request(user_id, amount_jpy, idempotency_key)
    except queue.InvalidJobRequest as exc:
        typer.echo(f"error: --{exc.field.replace('_', '-')} {exc.problem}", err=True)
        raise typer.Exit(2) from exc
    if not timeout > 0:
        typer.echo(f"error: --timeout must be more than 0 seconds, got {timeout:g}", err=True)
        raise typer.Exit(2)
    try:
        db_url = (
            queue.require_postgres(database_url, "--database-url")
            if database_url
            else queue.queue_url()
        )
    except queue.NotPostgres as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    with connect_or_exit(db_url) as conn:
        queue.ensure_schema(conn)
        try:
            job_id, created = queue.enqueue(conn, user_id, amount_jpy, idempotency_key)
        except (queue.IdempotencyConflict, queue.EmptyIdempotencyKey) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        typer.echo(job_id)
        if not created:
            typer.echo(
                f"idempotency key {idempotency_key!r} already enqueued as job {job_id}", err=True
            )
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while True:
            status = queue.job_status(conn, job_id) or {}
            if status.get("status") in ("done", "failed", "dead"):
                typer.echo(json.dumps(status, default=str))
                raise typer.Exit(0 if status["status"] == "done" else 1)
            if time.monotonic() >= deadline:
                typer.echo(f"job {job_id} still {status.get('status')} after {timeout}s", err=True)
                raise typer.Exit(3)
            time.sleep(0.05)
