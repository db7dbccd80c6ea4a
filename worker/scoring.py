"""How the worker scores a batch: request validation and the backends (in process, or the bento over HTTP)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bentos.scoring import ONLINE_TABLE, feature_name, online_table_name
from paylater.product import MAX_AMOUNT_JPY, MIN_AMOUNT_JPY
from paylater.redaction import redact

if TYPE_CHECKING:
    import numpy as np

    from bentos.scoring import Scorer
    from worker.queue import Job

log = logging.getLogger(__name__)


REASON_CODE_MODES = ("all", "declines")
"""'all': reason codes for every score (as the HTTP API); 'declines': only for declines, where
the app must explain itself. TreeSHAP costs ~50x a plain predict, so 'declines' is far cheaper."""


class InvalidRequest(ValueError):
    """The job's request can never be scored as it stands (bad payload, unknown user): not retried."""


class BackendUnavailable(RuntimeError):
    """The scoring backend cannot be reached at all: retry the batch later, do not blame one job."""


class BackendTimeout(RuntimeError):
    """The backend took the request but gave no answer in time. Either it is slow for everyone,
    or something in this batch makes it hang; the worker tells which by trying the halves."""


@dataclass(frozen=True)
class ScoreRequest:
    """A validated request: whom to score and for what amount."""

    job_id: int
    user_id: int
    amount_jpy: int


@dataclass(frozen=True)
class ScoreOutcome:
    """One request's score (the same fields the bento answers with)."""

    default_probability: float
    decision: str
    model_version: str
    reason_codes: list[str]


Outcome = ScoreOutcome | InvalidRequest
"""Per request: a score, or the reason this request is invalid."""


class ScoringBackend(Protocol):
    """Scores a batch; raises for a failure of the whole call (the worker then isolates the cause)."""

    @property
    def model_version(self) -> str:
        """The registry version scoring now."""
        ...

    def score(self, requests: Sequence[ScoreRequest]) -> list[Outcome]:
        """One outcome per request, in order."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def parse_request(job: Job) -> ScoreRequest:
    """The job's validated request; InvalidRequest naming exactly what is wrong."""
    from worker.queue import UndecodablePayload

    payload = job.payload
    if isinstance(payload, UndecodablePayload):
        raise InvalidRequest(f"payload is not decodable JSON ({payload.reason})")
    if not isinstance(payload, dict):
        raise InvalidRequest(
            f'payload must be a JSON object like {{"amount_jpy": 30000}}, got {type(payload).__name__}'
        )
    if "amount_jpy" not in payload:
        raise InvalidRequest("payload lacks amount_jpy (integer yen)")
    amount = payload["amount_jpy"]
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidRequest(
            f"amount_jpy must be an integer number of yen, got {type(amount).__name__} {amount!r}"
        )
    if job.user_id is None or job.user_id < 1:
        raise InvalidRequest(f"user_id must be a positive integer, got {job.user_id!r}")
    if not MIN_AMOUNT_JPY <= amount <= MAX_AMOUNT_JPY:
        raise InvalidRequest(
            f"amount_jpy {amount} is outside the product's limits {MIN_AMOUNT_JPY}..{MAX_AMOUNT_JPY}"
        )
    return ScoreRequest(job.id, int(job.user_id), amount)


def unknown_user(user_id: int) -> InvalidRequest:
    """The error of a user with no online features."""
    return InvalidRequest(f"unknown user_id {user_id}: no row in user_features_latest")


class OnlineFeatures:
    """user_features_latest rows as a float matrix in the model's column order (one query per batch).

    The same table and columns as bentos.scoring.FeatureStore, read as tuples straight into numpy:
    at 500 jobs a batch, per-row dicts cost more CPU than the plain predict.
    """

    def __init__(
        self,
        database_url: str,
        user_feature_names: Sequence[str],
        table: str = ONLINE_TABLE,
        answer_timeout: float | None = None,
    ) -> None:
        from psycopg import sql

        for name in user_feature_names:
            feature_name(name)
        self.database_url = database_url
        # A silent database fails the lookup (the jobs are held), instead of hanging the worker.
        self.answer_timeout = answer_timeout or _database_timeout()
        self.table = online_table_name(table)
        self.query = sql.SQL("SELECT user_id, {} FROM {} WHERE user_id = ANY(%(user_ids)s)").format(
            sql.SQL(", ").join(sql.Identifier(n) for n in user_feature_names),
            sql.Identifier(self.table),
        )
        self.width = len(user_feature_names)
        self.user_feature_names = list(user_feature_names)
        self._query_text: str | None = None
        self._local = threading.local()  # one connection per worker loop: no lock between loops
        self._all: list[Any] = []
        self._all_lock = threading.Lock()  # loops reconnect concurrently

    def lookup(self, user_ids: Sequence[int]) -> tuple[dict[int, int], np.ndarray]:
        """(row index by user id, float matrix of those rows; NULL is NaN) for the users found."""
        import numpy as np
        import psycopg

        try:
            rows = self._rows(user_ids)
        except Exception as exc:
            if isinstance(exc, psycopg.OperationalError):  # unreachable: no request's fault
                raise BackendUnavailable(f"feature database unreachable: {exc}") from exc
            if isinstance(exc, psycopg.errors.UndefinedColumn | psycopg.errors.UndefinedTable):
                # A model promoted before the feature build that publishes its features (or no
                # publish yet): a deployment mismatch, no request's fault; jobs wait for the fix.
                raise BackendUnavailable(self._mismatch(exc)) from exc
            raise
        index = {row[0]: i for i, row in enumerate(rows)}
        matrix = np.array([row[1:] for row in rows], dtype=np.float64).reshape(
            len(rows), self.width
        )
        return index, matrix

    def _rows(self, user_ids: Sequence[int]) -> list[Any]:
        """The rows of `user_ids`; asked once more on a new connection when the one opened
        before is found dead (the database restarted since) or its prepared statement stale."""
        from bentos.scoring import ask_again

        for retry in (True, False):
            reused = getattr(self._local, "conn", None) is not None and not self._local.conn.closed
            conn = None
            try:
                conn = self._connection()
                # Binary results: parsing 58 floats a row as text costs ~5x the CPU.
                return conn.execute(
                    self._text(conn), {"user_ids": list(user_ids)}, binary=True
                ).fetchall()
            except Exception as exc:
                again = retry and conn is not None and ask_again(exc, conn, reused)
                if conn is not None:
                    conn.close()  # reopened on the next call
                if not again:
                    raise
        raise AssertionError("unreachable")  # the second pass returns or raises

    def _mismatch(self, exc: Exception) -> str:
        """What the table lacks: every missing column (PostgreSQL's error names the first only),
        in the words of the service's 503; PostgreSQL's own when the table cannot be read."""
        import psycopg
        from psycopg import sql

        from bentos.scoring import table_mismatch

        cause = f"{self.table} does not fit the model: {str(exc).splitlines()[0]}"
        try:
            with (
                self._connection() as conn
            ):  # closed after: lookups reopen theirs as after any error
                # Not prepared: a statement planned before a republish fails after it.
                cursor = conn.execute(
                    sql.SQL("SELECT * FROM {} WHERE false").format(sql.Identifier(self.table)),
                    prepare=False,
                )
                columns: list[str] | None = [c.name for c in cursor.description or ()]
        except psycopg.errors.UndefinedTable:
            columns = None
        except Exception:  # the first answer says enough
            return cause
        mismatch = table_mismatch(self.table, columns, self.user_feature_names)
        return str(mismatch) if mismatch is not None else cause

    def _text(self, conn: Any) -> str:
        """The query rendered once (composing 60 identifiers per batch costs more than the query)."""
        if self._query_text is None:
            self._query_text = self.query.as_string(conn)
        return self._query_text

    def _connection(self) -> Any:
        """This thread's connection, (re)opened when needed."""
        from worker.queue import connect

        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = connect(self.database_url, answer_timeout=self.answer_timeout)
            with self._all_lock:  # closed ones dropped: an outage's reconnects would pile up
                self._all = [c for c in self._all if not c.closed] + [conn]
        return conn

    def close(self) -> None:
        """Close every thread's connection."""
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


def _database_timeout() -> float:
    """PAYLATER_WORKER_DATABASE_TIMEOUT_SECONDS."""
    from paylater.settings import get_settings

    return get_settings().worker_database_timeout_seconds


class InProcessBackend:
    """A Scorer (model from the BentoML store) fed from user_features_latest, in this process."""

    def __init__(
        self,
        scorer: Scorer,
        database_url: str,
        reason_codes: str = "all",
        table: str = ONLINE_TABLE,
        answer_timeout: float | None = None,
    ) -> None:
        if reason_codes not in REASON_CODE_MODES:
            raise ValueError(
                f"reason_codes must be one of {REASON_CODE_MODES}, got {reason_codes!r}"
            )
        self.scorer = scorer
        self.features = OnlineFeatures(
            database_url, scorer.user_feature_names, table, answer_timeout
        )
        self.reason_codes = reason_codes
        self.model_version = scorer.model_version
        names = scorer.feature_names
        self._amount_col = names.index("request_amount_jpy")
        self._fee_col = names.index("request_fee_jpy")
        self._user_cols = [names.index(n) for n in scorer.user_feature_names]

    def score(self, requests: Sequence[ScoreRequest]) -> list[Outcome]:
        """Look the users up in one query, score the known ones in one call."""
        import numpy as np

        from paylater.product import fee_for

        index, user_matrix = self.features.lookup(sorted({r.user_id for r in requests}))
        known = [i for i, r in enumerate(requests) if r.user_id in index]
        x = np.empty((len(known), len(self.scorer.feature_names)), dtype=np.float64)
        x[:, self._amount_col] = [requests[i].amount_jpy for i in known]
        x[:, self._fee_col] = [fee_for(requests[i].amount_jpy) for i in known]
        x[:, self._user_cols] = user_matrix[[index[requests[i].user_id] for i in known]]
        outcomes: list[Outcome] = [unknown_user(r.user_id) for r in requests]
        for i, outcome in zip(known, self._score_matrix(x), strict=True):
            outcomes[i] = outcome
        return outcomes

    def _score_matrix(self, x: np.ndarray) -> list[ScoreOutcome]:
        """The Scorer's scores; in 'declines' mode reasons (TreeSHAP) only where the answer is decline."""
        import numpy as np

        scorer = self.scorer
        if not len(x):
            return []
        if self.reason_codes == "all":
            proba, reasons = scorer.score_matrix(x)
        else:
            proba = np.asarray(scorer.booster.predict(x, num_threads=1), dtype=np.float64)
            reasons = [[] for _ in range(len(x))]
            declined = np.flatnonzero(proba >= scorer.cutoff)
            if declined.size:
                # The very code path the service uses, so a decline's reasons match the HTTP API's.
                exact, codes = scorer.score_matrix(x[declined])
                proba[declined] = exact
                for i, row_codes in zip(declined.tolist(), codes, strict=True):
                    reasons[i] = row_codes
        return [
            ScoreOutcome(p, "decline" if p >= scorer.cutoff else "approve", self.model_version, r)
            for p, r in zip(np.asarray(proba).tolist(), reasons, strict=True)
        ]

    def close(self) -> None:
        """Close the feature connections."""
        self.features.close()


class HttpBackend:
    """The bento's batch API (POST {url}/v2/score_batch); the service looks the features up itself."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        max_batch: int = 1000,
        timeout_seconds: float = 10.0,
    ) -> None:
        import httpx

        self.url = url.rstrip("/")
        # What errors (logged by the worker, stored in a failed job) call it: a URL's user:password
        # (httpx sends it as basic authentication) stays out of them.
        self.shown = redact(self.url)
        self.max_batch = max_batch
        self.timeout_seconds = timeout_seconds
        # Stripped as the service strips it: a newline from a secret file is in no header.
        token = (token or "").strip()
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(timeout=timeout_seconds, headers=headers)
        self.model_version = "unknown"  # learnt from the first answer

    def score(self, requests: Sequence[ScoreRequest]) -> list[Outcome]:
        """Score in calls of at most max_batch (the service's limit)."""
        outcomes: list[Outcome] = []
        for start in range(0, len(requests), self.max_batch):
            outcomes += self._score_chunk(requests[start : start + self.max_batch])
        return outcomes

    def _score_chunk(self, requests: Sequence[ScoreRequest]) -> list[Outcome]:
        """One POST; users the service does not know are failed and the rest asked again."""
        status, body = self._post(requests)
        if status == 404 and isinstance(body, dict) and body.get("error") == "unknown_user":
            unknown = {int(u) for u in body.get("user_ids", [])}
            known = [r for r in requests if r.user_id not in unknown]
            if not unknown or len(known) == len(requests):
                raise RuntimeError(f"score_batch answered 404 without usable user_ids: {body}")
            scored = iter(self._score_chunk(known) if known else [])
            return [
                unknown_user(r.user_id) if r.user_id in unknown else next(scored) for r in requests
            ]
        if status == 422 and len(requests) == 1:
            detail = body.get("detail") if isinstance(body, dict) else body
            return [InvalidRequest(f"scoring service rejected the request: {detail}")]
        if status == 504:
            # The service (BentoML's traffic timeout) or a gateway gave up on this batch: no
            # answer in time, as the client's own timeout, searched the same way.
            raise BackendTimeout(
                f"scoring service {self.shown} answered 504 (no answer in time) to a batch of"
                f" {len(requests)}: {body}"
            )
        if status in (401, 403, 429, 502, 503):
            # Wrong token, overloaded (429: BentoML past traffic.max_concurrency), down: no
            # request's fault, so no attempt spent.
            raise BackendUnavailable(f"scoring service {self.shown} answered {status}: {body}")
        if status in (404, 405):
            # Not the unknown-user answer: no such route here (a wrong URL, a service without
            # /v2). A deployment mistake, no request's fault: split down, every job would be
            # dead-lettered; instead the jobs wait, as for a service that is down.
            raise BackendUnavailable(
                f"scoring service answered {status} to POST {self.shown}/v2/score_batch"
                f" (is --url the service's base URL?): {body}"
            )
        if status != 200:
            # A 422 or 500 for a batch: the worker splits it to find the request at fault.
            raise RuntimeError(f"scoring service answered {status}: {body}")
        return [self._outcome(item) for item in _results_of(body, len(requests))]

    def _post(self, requests: Sequence[ScoreRequest]) -> tuple[int, Any]:
        """(status, decoded body) of one score_batch call."""
        import httpx

        payload = [{"user_id": r.user_id, "amount_jpy": r.amount_jpy} for r in requests]
        try:
            response = self._client.post(f"{self.url}/v2/score_batch", json=payload)
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            # Connected, so the service is up; the request itself may be what it is stuck on.
            raise BackendTimeout(
                f"scoring service {self.shown} gave no answer within {self.timeout_seconds:g} s"
                f" to a batch of {len(requests)}"
            ) from exc
        except (httpx.ConnectError, httpx.TimeoutException) as exc:
            raise BackendUnavailable(
                f"scoring service {self.shown} unreachable: {redact(str(exc))}"
            ) from exc
        except httpx.LocalProtocolError as exc:
            # This client cannot even send the call (a token no header can carry, say): the
            # worker's configuration, no request's fault.
            raise BackendUnavailable(
                f"cannot call scoring service {self.shown}: {redact(str(exc))}"
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = response.text[:300]
        return response.status_code, body

    def _outcome(self, item: dict[str, Any]) -> Outcome:
        """A v2 answer as an outcome; RuntimeError naming what is wrong with an answer the
        results table cannot hold (it would fail the write of the whole batch)."""
        probability = float(item["default_probability"])
        decision, version = str(item["decision"]), str(item["model_version"])
        if decision not in ("approve", "decline"):
            raise RuntimeError(f"scoring service answered decision {decision!r}: not a v2 answer")
        if not 0.0 <= probability <= 1.0:  # NaN fails this too
            raise RuntimeError(f"scoring service answered probability {probability!r}")
        if not version:
            raise RuntimeError("scoring service answered no model_version")
        self.model_version = version
        return ScoreOutcome(
            probability, decision, version, [str(c) for c in item.get("reason_codes") or []]
        )

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()


def _results_of(body: Any, expected: int) -> list[dict[str, Any]]:
    """The per-request items of a score_batch answer, checked for count."""
    if not isinstance(body, list) or len(body) != expected:
        raise RuntimeError(f"score_batch answered {type(body).__name__} for {expected} requests")
    return body
