"""The scoring service: `bentoml serve bentos.service:PaylaterScorer` or `bentoml serve paylater-scorer:<v>`.

The scoring routes are a lean ASGI app mounted inside the service instead of `@bentoml.api` methods:
BentoML's per-request API machinery (input IO model, thread hop, output schema, tracing span) cost
more CPU than scoring itself, and it answers bad input with 400 where this API promises 422.
The routes still run inside BentoML's server (its workers, metrics middleware, /readyz, /metrics).
"""

from __future__ import annotations

import gc
import hmac
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import bentoml
from pydantic import BaseModel

if TYPE_CHECKING:
    from bentos.scoring import CoalescingFeatureStore, Score, Scorer, SqliteFeatureStore

log = logging.getLogger("paylater.serving")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

HOT_PATHS = ["/v1/score", "/v2/score", "/v2/score_batch"]
MAX_BODY_BYTES = 4 * 1024 * 1024
REQUEST_TIMEOUT_SECONDS = 30
"""BentoML's limit on one request (the service's traffic timeout)."""
LOAD_WAIT_SECONDS = REQUEST_TIMEOUT_SECONDS - 5
"""Longest a request waits for a first load still under way before its 503 naming why: inside
the request timeout, so the caller gets that reason, not BentoML's bare timeout."""
READY_CHECK_SECONDS = 2.0
"""Longest wait in /readyz for the online table's check: a probe must answer within its own
timeout (Kubernetes: 1 s by default, often raised), not the lookup's."""
RESOLVED_VERSION_ENV = "PAYLATER_SERVE_RESOLVED_VERSION"
"""The registry version PAYLATER_SERVE_STAGE named when `bentoml serve` started: set in its parent
process before it spawns the workers, which inherit it (a worker restarted later too)."""
RESOLVE_ERROR_ENV = "PAYLATER_SERVE_RESOLVE_ERROR"
"""Set instead of RESOLVED_VERSION_ENV when the stage could not be resolved then: why."""
PIN_FILE_ENV = "PAYLATER_SERVE_PIN_FILE"
"""Set with RESOLVE_ERROR_ENV: a file, empty at first, where the first worker that resolves the
stage later writes the version, which every worker (a restarted one too) then loads."""
LOAD_RETRY_FIRST_SECONDS = 1.0
"""Wait before the second attempt to load the model; it doubles up to the setting
serve_load_retry_max_seconds (60 s): a tracking server restarting during a deploy is back in
seconds, and a longer outage costs one attempt a minute per worker, not a stream of them."""
RESOLVE_TIMEOUT_SECONDS = 120.0
"""Longest wait for that answer (an unreachable tracking server answers in seconds)."""
_JSON = [(b"content-type", b"application/json")]


class Reply(Exception):
    """An answer other than 200, raised from anywhere in a handler."""

    def __init__(self, status: int, error: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.body: dict[str, Any] = {"error": error, "detail": detail, **extra}


def _field_name(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the field path a client would write: `[3].features.x`."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def invalid(exc: Exception) -> Reply:
    """A 422 naming every field pydantic rejected."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return Reply(
            422, "invalid_request", str(exc), fields=[{"field": "body", "message": str(exc)}]
        )
    fields = [{"field": _field_name(tuple(e["loc"])), "message": e["msg"]} for e in exc.errors()]
    detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return Reply(422, "invalid_request", detail, fields=fields)


class Engine:
    """Everything a request needs, loaded once per worker; filled in by the service's __init__."""

    def __init__(self) -> None:
        self.scorer: Scorer | None = None
        self.features: CoalescingFeatureStore | SqliteFeatureStore | None = None
        self.token: bytes | None = None
        self.max_batch = 1000
        self.load_error: str | None = None
        """Why the last attempt to load the model failed (None: none failed yet)."""
        self.load_attempts = 0
        self.next_load_at: float | None = None
        """When (time.monotonic) the next attempt starts; None while one is under way."""
        self.table_problem: str | None = None
        """Why the online table does not fit the model, as last found (None: it fits)."""
        self.lookups_failing = False
        """Whether the last feature lookup failed (an outage is logged once, and its end)."""

    def ready_scorer(self) -> Scorer:
        """The scorer, or a 503 while the model is still loading (or failed to)."""
        if self.scorer is None:
            raise Reply(503, "not_ready", self.loading())
        return self.scorer

    def loading(self) -> str:
        """Why there is no scorer yet: loading, or the last failure and when the next try is."""
        if self.load_error is None:
            return "model is loading"
        if self.next_load_at is None:
            when = "trying again now"
        else:
            when = f"next in {max(0, math.ceil(self.next_load_at - time.monotonic()))} s"
        return f"model load failed (attempt {self.load_attempts}, {when}): {self.load_error}"

    def load_failed(self, reason: str, delay: float) -> None:
        """Record a failed attempt to load, and that the next starts in `delay` seconds."""
        self.load_attempts += 1
        self.load_error = reason
        self.next_load_at = time.monotonic() + delay

    async def loaded_scorer(self) -> Scorer:
        """The scorer, waiting for a load in progress: a worker still loading must not fail requests
        that the other (ready) worker's /readyz let through."""
        import asyncio

        deadline = asyncio.get_running_loop().time() + LOAD_WAIT_SECONDS
        while self.scorer is None and self.load_error is None:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        return self.ready_scorer()

    def table_found(self, problem: str | None) -> None:
        """Record whether the online table fits, logging each change once (not per request)."""
        if problem == self.table_problem:
            return
        if problem is None:
            log.info("the online table fits the model again: user_id lookups resume")
        else:
            log.error("not ready: %s", problem)
        self.table_problem = problem

    async def not_ready_reason(self) -> str | None:
        """Why this worker cannot score now, None when it can: no model (yet), or an online
        table without the model's feature columns, checked anew on each call so that a fixed
        table is noticed without a restart. A database that does not answer the check leaves
        the last finding standing: it is every replica's outage, which the lookups' 503s name;
        taking every replica out of the load balancer would only hide the reason from callers."""
        import asyncio

        from bentos.scoring import FeatureTableMismatch

        if self.scorer is None:
            return self.loading()
        if self.features is None:
            return None
        try:
            await asyncio.wait_for(self.features.check(), READY_CHECK_SECONDS)
        except FeatureTableMismatch as exc:
            self.table_found(str(exc))
        except Exception as exc:  # unreachable or slow: said by the lookups, not here
            log.debug("online table check failed: %r", exc)
        else:
            self.table_found(None)
        return self.table_problem

    def check_token(self, scope: Scope) -> None:
        """401 unless the bearer token matches (when one is configured)."""
        if self.token is None:
            return
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                # The scheme is case-insensitive (RFC 7235): OAuth clients send "bearer" too.
                if scheme.lower() == b"bearer" and hmac.compare_digest(credentials, self.token):
                    return
                break
        raise Reply(401, "unauthorized", "missing or wrong bearer token")

    def _user_features(
        self, scorer: Scorer, features: dict[str, float | None], at: str
    ) -> dict[str, Any]:
        """An explicit feature vector, checked against the model's user features by name."""
        known = scorer.user_feature_set
        if len(features) == len(known) and known.issuperset(features):
            return features
        unknown = [k for k in features if k not in known]
        missing = [n for n in scorer.user_feature_names if n not in features]
        fields = [{"field": f"{at}features.{k}", "message": "unknown feature"} for k in unknown]
        fields += [
            {"field": f"{at}features.{n}", "message": "missing feature (send null when unknown)"}
            for n in missing
        ]
        detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        raise Reply(422, "invalid_request", detail, fields=fields)

    async def score_requests(self, requests: list[Any], batch: bool) -> list[Score]:
        """Look up features for user ids (one query), then score every request in one call."""
        from bentos.scoring import FeatureTableMismatch

        scorer = self.scorer or await self.loaded_scorer()
        user_ids = [r.user_id for r in requests if r.user_id is not None]
        found: dict[int, dict[str, Any]] = {}
        if user_ids:
            if self.features is None:
                raise Reply(
                    503, "no_feature_store", "PAYLATER_SOURCE_URL is neither PostgreSQL nor SQLite"
                )
            try:
                found = await self.features.lookup(user_ids)
            except FeatureTableMismatch as exc:
                self.table_found(str(exc))
                raise Reply(503, "feature_table_mismatch", str(exc)) from None
            except Exception as exc:
                if not self.lookups_failing:
                    # Once per outage, not per request: under load that is thousands a second.
                    log.error("feature lookup failed (said once until one answers): %r", exc)
                    self.lookups_failing = True
                raise Reply(
                    503, "feature_store_unavailable", f"feature lookup failed: {exc}"
                ) from None
            if self.lookups_failing:
                log.info("feature lookups answer again")
                self.lookups_failing = False
            missing = sorted({u for u in user_ids if u not in found})
            if missing:
                raise Reply(
                    404,
                    "unknown_user",
                    f"no features for user_id {', '.join(map(str, missing))}",
                    user_ids=missing,
                )
        rows = []
        for i, r in enumerate(requests):
            at = f"[{i}]." if batch else ""
            feats = (
                found[r.user_id]
                if r.user_id is not None
                else self._user_features(scorer, r.features, at)
            )
            rows.append(scorer.request_row(r.amount_jpy, feats))
        return scorer.score_rows(rows)

    async def v2_score(self, body: bytes) -> Any:
        """POST /v2/score."""
        from bentos.models import ScoreRequestV2

        try:
            request = ScoreRequestV2.model_validate_json(body)
        except ValueError as exc:
            raise invalid(exc) from None
        return _v2_answer((await self.score_requests([request], batch=False))[0])

    async def v2_score_batch(self, body: bytes) -> Any:
        """POST /v2/score_batch."""
        from bentos.models import ScoreBatchV2

        try:
            requests = ScoreBatchV2.model_validate_json(body).root
        except ValueError as exc:
            raise invalid(exc) from None
        if len(requests) > self.max_batch:
            detail = f"batch of {len(requests)} requests exceeds the limit of {self.max_batch}"
            raise Reply(
                422, "invalid_request", detail, fields=[{"field": "body", "message": detail}]
            )
        return [_v2_answer(s) for s in await self.score_requests(requests, batch=True)]

    async def v1_score(self, body: bytes) -> Any:
        """POST /v1/score: the previous schema, adapted to v2 and answered in the old shape."""
        from bentos.models import ScoreRequestV1

        try:
            old = ScoreRequestV1.model_validate_json(body)
        except ValueError as exc:
            raise invalid(exc) from None
        score = (await self.score_requests([old.to_v2()], batch=False))[0]
        return {
            "customer_id": old.customer_id,
            "risk_score": score.default_probability,
            "approved": score.decision == "approve",
            "model_version": score.model_version,
            "reasons": score.reason_codes,
        }


def _v2_answer(score: Score) -> dict[str, Any]:
    """The v2 response body of one score."""
    return {
        "default_probability": score.default_probability,
        "decision": score.decision,
        "model_version": score.model_version,
        "reason_codes": score.reason_codes,
    }


ENGINE = Engine()


class ScoringRoutes:
    """A raw ASGI app: read the body, dispatch by path, answer JSON; never lets an error escape."""

    def __init__(
        self, engine: Engine, routes: dict[str, Callable[[bytes], Awaitable[Any]]]
    ) -> None:
        self.engine = engine
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request (lifespan events are acknowledged and ignored)."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        from pydantic_core import to_json

        status, payload = 200, None
        try:
            handler = self.routes.get(scope["path"]) or self.routes.get(
                scope.get("root_path", "") + scope["path"]
            )
            if handler is None:
                raise Reply(404, "not_found", f"no route {scope['path']}")
            if scope["method"] != "POST":
                raise Reply(405, "method_not_allowed", "use POST")
            self.engine.check_token(scope)
            payload = await handler(await _read_body(receive))
        except Reply as reply:
            status, payload = reply.status, reply.body
        except Exception:
            log.exception("scoring request failed")
            status, payload = 500, {"error": "internal", "detail": "internal error, logged"}
        body = to_json(payload)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*_JSON, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    """The whole request body, refusing bodies over MAX_BODY_BYTES."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Reply(413, "too_large", f"request body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks) if len(chunks) > 1 else chunks[0]


async def _lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge lifespan startup/shutdown for servers that send them to mounted apps."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


V2 = ScoringRoutes(ENGINE, {"/v2/score": ENGINE.v2_score, "/v2/score_batch": ENGINE.v2_score_batch})
V1 = ScoringRoutes(ENGINE, {"/v1/score": ENGINE.v1_score})


class ModelInfo(BaseModel):
    """Which model this service scores with."""

    model_version: str
    feature_names: list[str]
    cutoff: float


@bentoml.service(
    name="paylater-scorer",
    # Two workers for two cores, like the gunicorn baseline; more only add contention.
    workers=2,
    traffic={"timeout": REQUEST_TIMEOUT_SECONDS},
    # Per-request access logs and tracing spans cost more CPU than a score: metrics stay on.
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": HOT_PATHS, "sample_rate": 0.0},
)
@bentoml.asgi_app(V2, path="/v2", name="v2")
@bentoml.asgi_app(V1, path="/v1", name="v1")
class PaylaterScorer:
    """Scores pay-later requests with a registry version of paylater-default."""

    def __init__(self) -> None:
        from paylater.settings import get_settings

        settings = get_settings()
        # BentoML's server logging passes WARNING and above from other loggers: which version a
        # worker loaded is worth a line in the server's log.
        log.setLevel(logging.INFO)
        ENGINE.token = api_token()
        ENGINE.max_batch = settings.serve_max_batch
        # Loading runs beside the server so /readyz can say "not yet" instead of hanging.
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        """Load the model (embedded in the bento, or the version pinned at start) and the feature
        store, trying again with capped exponential backoff until it loads: a tracking server or
        model store out of reach while the service starts would otherwise leave it unready for
        good (Kubernetes does not restart a pod that is only not ready)."""
        from paylater.settings import get_settings

        cap = get_settings().serve_load_retry_max_seconds
        said: str | None = None
        while True:
            ENGINE.next_load_at = None
            try:
                scorer = _load_scorer()
                features = _feature_store(scorer.user_feature_names)
                _check_table_at_start(scorer.user_feature_names)
            except Exception as exc:  # keep serving /readyz=false and 503s with the reason
                lasting, reason = load_failure(exc)
                delay = retry_delay(ENGINE.load_attempts + 1, lasting, cap)
                ENGINE.load_failed(reason, delay)
                if said is None:
                    log.exception("%s", ENGINE.loading())
                elif _without_addresses(reason) != said:  # not a traceback per attempt
                    log.error("%s", ENGINE.loading())
                said = _without_addresses(reason)
                time.sleep(delay)
                continue
            break
        ENGINE.features = features
        # Startup objects (BentoML, MLflow, LightGBM imports) never die: moving them out of the
        # collector's reach keeps full collections, and so latency spikes, short under load.
        gc.collect()
        gc.freeze()
        ENGINE.scorer = scorer  # last: a set scorer is what "ready" means
        ENGINE.load_error = None
        log.info(
            "serving model version %s (features %s)%s",
            scorer.model_version,
            scorer.feature_names,
            f", loaded at attempt {ENGINE.load_attempts + 1}" if ENGINE.load_attempts else "",
        )

    @bentoml.on_deployment
    @staticmethod
    def _resolve_stage_once() -> None:
        """Pin the version PAYLATER_SERVE_STAGE names for this service's whole life.

        BentoML runs this once, in `bentoml serve`'s parent process, before it creates the
        workers; circus copies the parent's environment when it creates them and starts every
        worker, a restarted one too, with that copy. A worker resolving the alias itself would load
        whatever it names when BentoML restarts it (after a crash), next to a worker still serving
        the version from before a promotion or a rollback.
        """
        # The decorated class is a bentoml Service; `bento` is set when served from a built bento,
        # which serves the model it embeds.
        if cast(Any, PaylaterScorer).bento is None:
            log.setLevel(logging.INFO)
            pin_served_version(os.environ)

    async def __is_ready__(self) -> bool:
        """Ready once the model and feature store are loaded and the online table has the model's
        feature columns; otherwise /readyz answers 503 saying why (BentoML's own answer to False
        names no reason, and an operator's first question is which column is missing)."""
        from starlette.exceptions import HTTPException

        reason = await ENGINE.not_ready_reason()
        if reason is not None:
            raise HTTPException(status_code=503, detail=f"not ready: {reason}")
        return True

    @bentoml.api(route="/model_info")
    def model_info(self, ctx: bentoml.Context) -> ModelInfo:
        """The served model version, its features and cutoff; 503 with the reason while there is
        none (loading, or a load that failed), as the scoring routes answer. Behind the API token
        like them: the feature names and the cutoff tell a caller how to game a decision. (The
        probes /readyz and /livez and Prometheus' /metrics stay open.)"""
        try:
            ENGINE.check_token(ctx.request.scope)
            scorer = ENGINE.ready_scorer()
        except Reply as reply:
            # BentoML turns any exception here into 500 "unexpected error" with a traceback in the
            # log; a Response is passed through as it is, with the status set on the context
            # (BentoML copies ctx.response.status_code onto whatever a method with ctx returns).
            from starlette.responses import JSONResponse

            ctx.response.status_code = reply.status
            return cast(ModelInfo, JSONResponse(reply.body, status_code=reply.status))
        return ModelInfo(
            model_version=scorer.model_version,
            feature_names=scorer.feature_names,
            cutoff=scorer.cutoff,
        )


def api_token() -> bytes | None:
    """PAYLATER_API_TOKEN as requests must carry it, or None (no auth) when unset or blank.
    Stripped: a token from a secret file or `echo` ends in a newline no header can carry, and
    every client would be answered 401."""
    from paylater.settings import get_settings

    token = (get_settings().api_token or "").strip()
    return token.encode() if token else None


def pin_served_version(environ: MutableMapping[str, str]) -> None:
    """Resolve PAYLATER_SERVE_STAGE now and record the version in `environ`. When it cannot be
    resolved, record why, and an empty pin file: the workers answer 503 naming the reason while
    they ask again, and the first to get an answer pins it there for all (see _pin_late)."""
    from paylater.settings import get_settings

    environ.pop(RESOLVED_VERSION_ENV, None)
    environ.pop(RESOLVE_ERROR_ENV, None)
    environ.pop(PIN_FILE_ENV, None)
    stage = "?"
    try:
        stage = get_settings().serve_stage
        version = _resolve_in_child(stage)
    except Exception as exc:
        reason = " ".join(str(exc).split()) or repr(exc)
        environ[RESOLVE_ERROR_ENV] = (
            f"PAYLATER_SERVE_STAGE={stage} could not be resolved when the service started: {reason}"
        )
        try:
            environ[PIN_FILE_ENV] = _pin_file()
        except OSError as no_file:  # no writable temporary directory: it must still start
            log.error(
                "%s; restart the service to try again (no pin file for the workers: %s)",
                environ[RESOLVE_ERROR_ENV],
                no_file,
            )
            return
        log.error(
            "%s; the workers ask again until it answers, and all serve the version the first"
            " answer names",
            environ[RESOLVE_ERROR_ENV],
        )
        return
    environ[RESOLVED_VERSION_ENV] = version
    log.info(
        "PAYLATER_SERVE_STAGE=%s names model version %s: this service serves it until restarted",
        stage,
        version,
    )


def _pin_file() -> str:
    """A new empty file for the version the workers resolve later, removed when this process
    (`bentoml serve`'s parent, which outlives its workers) exits."""
    import atexit
    import contextlib
    import tempfile

    handle, path = tempfile.mkstemp(prefix="paylater-serve-", suffix=".version")
    os.close(handle)

    def remove() -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)

    atexit.register(remove)
    return path


def _pin_late(stage: str, error: str) -> str:
    """The version the service serves when its parent could not resolve `stage` at start: the
    one already in the pin file, else `stage` resolved now and written there, under a lock.

    Every worker, and one BentoML restarts later, loads the first answer any worker got: workers
    each resolving the alias on their own could straddle a promotion and serve two versions
    side by side, as _resolve_stage_once explains. Without a pin file (a parent of another
    version) the worker must not ask at all: only a restart resolves it."""
    import fcntl

    from bentos.build import resolve_version

    path = os.environ.get(PIN_FILE_ENV)
    if not path:
        raise Unresolved(f"{error}: restart the service to resolve it again")
    with open(path, "r+", encoding="utf-8") as pin:
        fcntl.flock(pin, fcntl.LOCK_EX)
        pinned = pin.read().strip()
        if pinned:
            return pinned
        try:
            version = resolve_version(stage)
        except Exception as exc:
            reason = " ".join(str(exc).split()) or repr(exc)
            raise Unresolved(f"{error}; asked again: {reason}") from exc
        pin.write(version)
        pin.flush()
    log.info(
        "PAYLATER_SERVE_STAGE=%s names model version %s (unresolved at start, asked again):"
        " every worker serves it until the service is restarted",
        stage,
        version,
    )
    return version


_RESOLVE = """\
import sys
from bentos.build import resolve_version, unloadable
try:
    print(resolve_version(sys.argv[1]))
except Exception as exc:
    sys.exit(unloadable(exc) or repr(exc))
"""


def _resolve_in_child(stage: str) -> str:
    """bentos.build.resolve_version(stage), asked in a short-lived Python process: MLflow's imports
    (about 180 MB) would otherwise stay in `bentoml serve`'s parent process for the service's life."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)  # where `bentos` imports from
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RESOLVE, stage],
            env={**os.environ, "PYTHONPATH": path},
            capture_output=True,
            text=True,
            timeout=RESOLVE_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"no answer in {RESOLVE_TIMEOUT_SECONDS:.0f} s") from None
    said = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode != 0 or not done.stdout.strip():
        raise LookupError(said[-1] if said else f"no version (exit status {done.returncode})")
    return done.stdout.split()[-1]


def _load_scorer() -> Scorer:
    """The model embedded in the served bento, else the version PAYLATER_SERVE_STAGE named when
    the service started (pinned by its parent process, or by the first worker to resolve it when
    the parent could not), else the one it names now (a service started without that hook)."""
    from bentoml._internal.context import server_context

    from bentos.build import BENTO_NAME, model_tag
    from bentos.scoring import Scorer
    from paylater.settings import get_settings

    settings = get_settings()
    if server_context.bento_name == BENTO_NAME and server_context.bento_version not in (
        "",
        "not available",
    ):
        return Scorer.from_store(
            model_tag(server_context.bento_version), cutoff=settings.serve_cutoff
        )
    version = os.environ.get(RESOLVED_VERSION_ENV) or None
    if error := os.environ.get(RESOLVE_ERROR_ENV):
        version = _pin_late(settings.serve_stage, error)
    return Scorer.load(stage=settings.serve_stage, version=version, cutoff=settings.serve_cutoff)


def _without_addresses(reason: str) -> str:
    """`reason` without the object addresses some errors quote (`<… object at 0x7f…>`), which
    differ on each attempt although the reason is the same."""
    import re

    return re.sub(r" at 0x[0-9a-fA-F]+", "", reason)


class Unresolved(LookupError):
    """The stage could not be resolved when the service started, and may not be now."""


def load_failure(exc: BaseException) -> tuple[bool, str]:
    """Whether a failed load cannot heal by waiting (its cause is wrong, not out of reach), and
    one line saying why; for one that cannot, also what to fix."""
    reason = " ".join(str(exc).split()) or repr(exc)
    if isinstance(exc, Unresolved):
        if exc.__cause__ is None:
            return True, reason  # it says what to do
        if _lasting_fix(exc.__cause__) is None:
            return False, (
                f"{reason} (the service keeps asking: make the registry reachable,"
                " MLFLOW_TRACKING_URI, or restart the service)"
            )
        return True, (
            f"{reason} (set PAYLATER_SERVE_STAGE to production, staging or a version the"
            " registry has, and restart the service)"
        )
    cause: BaseException | None = exc
    while cause is not None:
        fix = _lasting_fix(cause)
        if fix is not None:
            return True, f"{reason} ({fix})"
        cause = cause.__cause__
    return False, reason


def _lasting_fix(exc: BaseException) -> str | None:
    """What an operator must fix when `exc` cannot heal by waiting; None when it may (out of
    reach, timed out, anything not known to last)."""
    from bentoml.exceptions import NotFound
    from lightgbm.basic import LightGBMError
    from mlflow.exceptions import MlflowException

    from registry.store import is_absent

    another = "serve another version or bento, or fix this one (it is tried again meanwhile)"
    if isinstance(exc, MlflowException) and is_absent(exc):
        return f"the registry lacks it: `paylater registry list` names those it has; {another}"
    if isinstance(exc, NotFound):
        return f"the model store lacks it; {another}"
    if isinstance(exc, LightGBMError):
        return (
            "not a readable LightGBM model: import the version again (paylater bento import"
            " --version <version>), which the next attempt loads; a bento: build it again"
        )
    if isinstance(exc, ValueError):
        return f"this code cannot serve that model as it is; {another}"
    return None


def retry_delay(attempt: int, lasting: bool, cap: float) -> float:
    """Seconds to wait after failed attempt number `attempt`: 1 s doubling up to `cap`, or `cap`
    at once when the failure cannot heal by waiting. Those are still tried again rather than
    given up: what is found wrong may be fixed outside the service (a version registered, a
    damaged store entry deleted), and a failure taken for lasting that was not still heals."""
    if lasting:
        return cap
    return float(min(cap, LOAD_RETRY_FIRST_SECONDS * 2 ** min(attempt - 1, 32)))


def _check_table_at_start(user_feature_names: Sequence[str]) -> None:
    """Say at startup, in the log, when the online table does not fit the model (the worker is
    then not ready until it does; /readyz checks it again on each probe)."""
    from bentos.scoring import FeatureStore, FeatureTableMismatch
    from paylater.postgres import libpq_url
    from paylater.redaction import redact
    from paylater.settings import get_settings

    settings = get_settings()
    if not settings.source.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        return  # SQLite: its first probe checks; nothing else has a table to check
    store = FeatureStore(
        libpq_url(settings.source), user_feature_names, settings.online_features_table
    )
    try:
        store.check()
    except FeatureTableMismatch as exc:
        ENGINE.table_found(str(exc))
    except Exception as exc:  # the database down at startup: the lookups will say so
        log.warning("could not check the online table at startup: %s", redact(str(exc)))
    finally:
        store.close()


def _feature_store(
    user_feature_names: Sequence[str],
) -> CoalescingFeatureStore | SqliteFeatureStore | None:
    """The online feature store of the model's user features in the source database: PostgreSQL,
    or the embedded SQLite file."""
    from bentos.scoring import CoalescingFeatureStore, SqliteFeatureStore
    from paylater.postgres import libpq_url
    from paylater.redaction import redact
    from paylater.settings import get_settings

    settings = get_settings()
    url, table = settings.source, settings.online_features_table
    if url.startswith("sqlite:///"):
        return SqliteFeatureStore(url.removeprefix("sqlite:///"), user_feature_names, table)
    if not url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        log.warning(
            "source %s is neither PostgreSQL nor SQLite: user_id lookups answer 503", redact(url)
        )
        return None
    return CoalescingFeatureStore(libpq_url(url), user_feature_names, table)
